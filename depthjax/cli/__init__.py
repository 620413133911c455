"""The `depthjax` command line: one module per command, each with `add_command(sub)`.

This is the one place where a user error (a bad config, program, checkpoint, spec, data
or flag: any of the named classes in `_user_errors`) becomes a one-line
`depthjax CMD: error: ...` on stderr and exit code 2; commands just raise. Any other
exception is a bug: its traceback is printed, followed by a line saying so, and the exit
code is 1. `DEPTHJAX_DEBUG=1` lets every exception propagate. Command modules import the
heavy libraries only when they run, so `depthjax --help` starts quickly.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

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
    except KeyboardInterrupt:
        if os.environ.get("DEPTHJAX_DEBUG"):
            raise
        print(f"depthjax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("DEPTHJAX_DEBUG"):
            raise
        # The classes are resolved only here, so start-up does not import the data stack.
        if isinstance(e, _user_errors()):
            print(f"depthjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"depthjax {args.command}: internal error ({type(e).__name__}): this is a bug in "
            "depthjax, not a problem with your input; please report it with the traceback "
            "above (DEPTHJAX_DEBUG=1 re-raises it)",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _user_errors() -> tuple[type, ...]:
    from ..core.attention import AttentionUnavailable
    from ..core.config import ConfigError
    from ..core.model import InputError
    from ..core.program import ProgramError
    from ..core.sharding import ShardingError
    from ..eval import EvalError
    from ..files.checkpoint import CheckpointError
    from ..files.integrity import IntegrityError
    from ..files.textfiles import DataError
    from ..files.tokenizer import TokenizerError
    from ..hf.config import HFError
    from ..inference.sampling import GenerationError
    from ..metrics import MetricError
    from ..pruning.choose import PruneError
    from ..pruning.recovery import RecoverError
    from ..search import SearchError
    from ..train.config import TrainConfigError
    from ..train.run_dir import RunDirError
    from .common import UsageError

    return (
        AttentionUnavailable,
        CheckpointError,
        ConfigError,
        DataError,
        EvalError,
        GenerationError,
        HFError,
        InputError,
        IntegrityError,
        MetricError,
        ProgramError,
        PruneError,
        RecoverError,
        RunDirError,
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
