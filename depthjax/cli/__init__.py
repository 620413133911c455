"""The `depthjax` command line: one module per command, each with `add_command(sub)`.

This is the one place where a user error (a bad config, program, checkpoint, spec, data
or flag) becomes `depthjax CMD: error: ...` on stderr and exit code 2; commands just
raise. `DEPTHJAX_DEBUG=1` shows the traceback instead. Command modules import the heavy
libraries only when they run, so `depthjax --help` starts quickly.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import progress
from . import convert, demo, depth, eval, generate, presets, prune, score, search, train  # noqa: A004

COMMANDS = (demo, presets, train, score, prune, search, eval, depth, convert, generate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="depthjax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_command(sub)
    args = parser.parse_args(argv)
    try:
        with progress.quiet(getattr(args, "quiet", False)):
            return args.func(args)
    except (ValueError, OSError) as e:  # every user error class derives from one of these
        # The classes are resolved only here, so start-up does not import the data stack.
        if os.environ.get("DEPTHJAX_DEBUG") or not isinstance(e, _user_errors()):
            raise
        print(f"depthjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type, ...]:
    from ..attention import AttentionUnavailable
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..decoding import GenerationError
    from ..eval import EvalError
    from ..hf.config import HFError
    from ..program import ProgramError
    from ..search import SearchError
    from ..sharding import ShardingError
    from ..textfiles import DataError
    from ..tokenizer import TokenizerError
    from ..train.config import TrainConfigError
    from .common import UsageError

    return (
        AttentionUnavailable,
        CheckpointError,
        ConfigError,
        DataError,
        EvalError,
        GenerationError,
        HFError,
        ProgramError,
        SearchError,
        ShardingError,
        TokenizerError,
        TrainConfigError,
        UsageError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )
