"""What several commands share: loading a model with its tokenizer, calibration data,
argument types and checks of output paths."""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(ValueError):
    """Flags that do not fit together (reported as `depthjax CMD: error: ...`, exit 2)."""


def count(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def natural(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def check_out_dir(path, flag: str = "--out", *, checkpoint: bool = False) -> None:
    """Refuse an output path that cannot be written before any work is done: a file, or
    (checkpoint=True) a non-empty directory that is not a depthjax checkpoint."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is a file; give a directory")
    if checkpoint and p.is_dir() and any(p.iterdir()) and not (p / "manifest.json").exists():
        raise UsageError(f"{flag} {p} is a directory that is not a depthjax checkpoint; "
                         "refusing to overwrite it")


def load_model(path, tokenizer: str | None = None):
    """(model, tokenizer) of a native checkpoint or a local Hugging Face directory;
    `tokenizer` ('byte' or a tokenizer.json) overrides the directory's own."""
    from ..checkpoint import load_model as load
    from ..tokenizer import tokenizer_for
    model = load(path)
    return model, tokenizer_for(path, model.config.vocab_size, tokenizer)


def add_data_args(p) -> None:
    """--model and the calibration-text flags of `score` and `prune`."""
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    p.add_argument("--batches", type=count, default=4, help="calibration batches (default 4)")
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--seq-len", type=count, default=128)
    p.add_argument("--seed", type=natural, default=0)


def load_with_data(args):
    """(model, calibration batches, evaluation batches) from the embedded corpus: the train
    split to score and calibrate, the validation split to evaluate."""
    from .. import corpus
    model, tok = load_model(Path(args.model))
    window = lambda split, seed: corpus.sample_windows(args.batch_size, args.seq_len, seed=seed,
                                                       split=split, encode=tok.encode)
    calib = [window("train", args.seed + i) for i in range(args.batches)]
    evals = [window("valid", args.seed + 1000 + i) for i in range(args.batches)]
    print(f"[data] {args.batches} x {args.batch_size} x {args.seq_len} tokens of stdlib "
          f"source (train to score, valid to evaluate)", flush=True)
    return model, calib, evals
