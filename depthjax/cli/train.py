"""`depthjax train`: train or resume a run directory (jax loads only when it runs)."""

from __future__ import annotations

import argparse
import sys

from .common import add_quiet_arg


def add_command(sub) -> None:
    from ..train.config import help_text

    p = sub.add_parser(
        "train",
        help="train or resume a model (sharded, checkpointed, resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train into --out; resumes automatically when it holds checkpoints. "
        "Writes metrics.jsonl, tensorboard/, checkpoints/ and the final model/.",
        epilog="keys (key=value; YAML values; nested keys with dots):\n"
        + help_text()
        + "\n\nexample: depthjax train --out runs/a model=llama-tiny steps=200 "
        "batch_size=16 seq_len=256 mesh.data=2 mesh.fsdp=2 mesh.tensor=2",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="YAML file of keys (key=value arguments override it)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    add_quiet_arg(p)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from .. import train

    tc = train.parse(args.overrides, args.config)
    tc.model_config()  # reject a bad preset / model.FIELD before any work
    try:
        train.run(args.out, tc)
    except train.NonFiniteLossError as e:  # not a user error: the run itself diverged
        print(f"depthjax train: {e}", file=sys.stderr)
        return 3
    return 0
