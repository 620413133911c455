"""The `depthjax` command line: one module per command, each with `add_command(sub)`.

This is the one place where a user error (a bad config, program, checkpoint, spec, data
or flag: any `depthjax.DepthjaxError`, or a path the file system refuses) becomes a one-line
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
from ..errors import DepthjaxError
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
        if isinstance(e, USER_ERRORS):
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


# Errors of the file system (a missing, existing or unreadable path the user named) are user
# errors too; every other builtin exception is a bug.
USER_ERRORS = (
    DepthjaxError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
