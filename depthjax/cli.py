"""The `depthjax` command line. Subcommands are registered in COMMANDS."""

from __future__ import annotations

import argparse
import os
import sys

from . import demo, score_cli, train_cli
from .depth import cli as depth_cli
from .hf import convert as hf_convert
from . import generate_cli


def _presets(args) -> int:
    import depthjax as dj
    for name in dj.configs.names():
        cfg = dj.configs.get(name)
        print(f"{name:14} {cfg.family:6} d_model={cfg.d_model:<5} layers={cfg.n_layers:<3} "
              f"heads={cfg.n_heads}/{cfg.n_kv_heads} vocab={cfg.vocab_size}")
    return 0


def _add_presets(sub):
    sub.add_parser("presets", help="list named model configs").set_defaults(func=_presets)


COMMANDS = [demo.add_command, _add_presets, train_cli.add_command]
COMMANDS.append(hf_convert.add_command)
COMMANDS.append(depth_cli.add_command)
COMMANDS.append(generate_cli.add_command)
COMMANDS.append(score_cli.add_commands)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="depthjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # every user error class is one of these
        # Bad input: say what is wrong, not where in the code. The classes are resolved
        # only here, so start-up does not import the data stack.
        if os.environ.get("DEPTHJAX_DEBUG") or not isinstance(e, _user_errors()):
            raise
        print(f"depthjax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type, ...]:
    from .attention import AttentionUnavailable
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .hf.hf_config import HFError
    from .program import ProgramError
    from .sharding import ShardingError
    from .train_config import TrainConfigError
    return (AttentionUnavailable, CheckpointError, ConfigError, DataError, HFError,
            ProgramError, ShardingError, TrainConfigError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
