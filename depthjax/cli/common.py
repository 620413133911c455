"""What several commands share: loading a model with its tokenizer, and calibration data."""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """Flags that do not fit together (reported as `depthjax CMD: error: ...`, exit 2)."""


def load_model(path, tokenizer: str | None = None):
    """(model, tokenizer) of a native checkpoint or a local Hugging Face directory;
    `tokenizer` ('byte' or a tokenizer.json) overrides the directory's own."""
    from ..checkpoint import load_model as load
    from ..tokenizer import tokenizer_for

    model = load(path)
    return model, tokenizer_for(path, model.config.vocab_size, tokenizer)


def add_quiet_arg(p) -> None:
    """--quiet for a long-running command (depthjax.cli.main applies it)."""
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-step lines (bars show only on a terminal)",
    )


def add_data_args(p) -> None:
    """--model and the calibration-text flags of `score` and `prune`."""
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


def load_with_data(args):
    """(model, calibration batches, evaluation batches) from the embedded corpus: the train
    split to score and calibrate, the validation split to evaluate."""
    from .. import corpus

    model, tok = load_model(Path(args.model))
    window = lambda split, seed: corpus.sample_windows(
        args.batch_size, args.seq_len, seed=seed, split=split, encode=tok.encode
    )
    calib = [window("train", args.seed + i) for i in range(args.batches)]
    evals = [window("valid", args.seed + 1000 + i) for i in range(args.batches)]
    print(
        f"[data] {args.batches} x {args.batch_size} x {args.seq_len} tokens of stdlib "
        f"source (train to score, valid to evaluate)",
        flush=True,
    )
    return model, calib, evals
