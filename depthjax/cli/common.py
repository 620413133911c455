"""What several commands share: reading a model directory once (a ModelDir), calibration
data (the embedded corpus or the user's files), task measures, argument types and checks of
output paths."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import DepthjaxError


class UsageError(DepthjaxError):
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
        raise UsageError(
            f"{flag} {p} is a directory that is not a depthjax checkpoint; refusing to overwrite it"
        )


def mesh_sizes(text: str) -> dict[str, int]:
    """argparse type of --mesh: 'fsdp=4,tensor=2' -> {"fsdp": 4, "tensor": 2} (axes data,
    fsdp, tensor; one may be -1, and data is -1, the devices left, unless given)."""
    from ..core.sharding import MESH_AXES

    sizes = {}
    for part in text.split(","):
        axis, eq, value = part.strip().partition("=")
        if axis not in MESH_AXES or not eq:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}"
            )
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}: {value!r} is not an integer"
            ) from None
    return sizes


def read_model(
    path,
    tokenizer: str | None = None,
    program: str | None = None,
    param_dtype: str | None = None,
    mesh: dict[str, int] | None = None,
    **options,
):
    """The ModelDir of a native checkpoint or a local Hugging Face directory, read once:
    `tokenizer` ('byte' or a tokenizer.json) overrides the directory's own; `program` is a
    slice spec applied to the model's table; `param_dtype` (--param-dtype) the weights'
    dtype (None: float32 for a Hugging Face directory, the saved one for a native
    checkpoint); `mesh` (--mesh) the mesh sizes to shard the weights over as they are read
    (depthjax.core.sharding); `options` go to the loader (ModelDir.read)."""
    from ..files import ModelDir

    if param_dtype is not None:
        options["param_dtype"] = param_dtype
    if mesh is not None:
        from ..core.sharding import make_mesh

        options["mesh"] = make_mesh(**{"data": -1, **mesh})
    md = ModelDir.read(path, tokenizer=tokenizer, **options)
    if mesh is not None:
        import sys

        import jax

        from ..core.sharding import device_bytes

        held = device_bytes(md.model.params)
        total = sum(x.nbytes for x in jax.tree.leaves(md.model.params))
        print(
            f"[load] weights sharded over {dict(options['mesh'].shape)}: the busiest of "
            f"{len(held)} devices holds {max(held.values()) / total:.1%} of them",
            file=sys.stderr,
            flush=True,
        )
    if program is not None:
        from ..depth import from_spec, load_spec

        md = dataclasses.replace(md, model=from_spec(md.model, load_spec(program)))
    return md


def add_load_args(p) -> None:
    """--param-dtype and --mesh for a command that loads a model."""
    from ..core.config import DTYPES

    p.add_argument(
        "--param-dtype",
        choices=DTYPES,
        default=None,
        help="dtype the weights are held in (default: float32 for a Hugging Face "
        "directory, as saved for a native checkpoint); bfloat16 halves their memory",
    )
    p.add_argument(
        "--mesh",
        type=mesh_sizes,
        default=None,
        metavar="AXIS=N,...",
        help="shard the weights over the devices as they are read, e.g. fsdp=4,tensor=2 "
        "(axes data, fsdp, tensor; data takes the devices left); results equal the "
        "one-device run's",
    )


def add_quiet_arg(p) -> None:
    """--quiet for a long-running command (depthjax.cli.main applies it)."""
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-step lines (bars show only on a terminal)",
    )


def add_data_args(p) -> None:
    """--model and the calibration / task flags of `score` and `prune`."""
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    add_load_args(p)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json (default: the model directory's, else byte)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="calibration text: .txt/.jsonl files, a glob or directory, or "
        "tfds:NAME[:SPLIT] (default: the embedded stdlib corpus); the first "
        "80%% of its tokens score and calibrate, the rest evaluate",
    )
    p.add_argument(
        "--task",
        default=None,
        help="measure ablation, Shapley values and removal curves on this task "
        "(JSONL: context/choices/label, context/target, or text)",
    )
    p.add_argument(
        "--task-metric",
        default="acc",
        choices=["acc", "acc_norm", "acc_bytes", "nll"],
        help="what a multiple-choice --task measures (default acc: 1 - accuracy)",
    )
    p.add_argument("--batches", type=count, default=4, help="calibration batches (default 4)")
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--seq-len", type=count, default=128)
    p.add_argument("--seed", type=natural, default=0)


@dataclasses.dataclass
class Data:
    """A model with its calibration and evaluation batches and what to measure them by."""

    model: object
    tokenizer: object
    calib: list
    evals: list
    task: object = None  # a depthjax.eval task from --task
    pooling: dict | None = None  # a sentence-transformers directory's pooling
    model_dir: object = None  # the ModelDir read from --model (its files travel on save)

    def measure(self, batches):
        """The --task, else the model's default measure on `batches` (next-token loss; for
        encoders 1 - the cosine of pooled embeddings to the full model's)."""
        from ..pruning.report import default_measure

        return (
            self.task
            if self.task is not None
            else default_measure(self.model, batches, **(self.pooling or {}))
        )


def load_with_data(args) -> Data:
    """The model and batches from --data (its token stream split 80/20) or the embedded
    corpus (train split to score, validation split to evaluate), and the --task."""
    from ..files import corpus

    md = read_model(args.model, args.tokenizer, param_dtype=args.param_dtype, mesh=args.mesh)
    model, tok = md.model, md.tokenizer
    n, B, T = args.batches, args.batch_size, args.seq_len
    if args.data:
        import numpy as np

        from ..eval import documents

        docs = documents(args.data)
        stream = np.concatenate([np.asarray(tok.encode(d), np.int32) for d in docs])
        cut = int(0.8 * stream.size)
        if min(cut, stream.size - cut) < T:
            raise UsageError(
                f"--data has {stream.size} tokens: too few for windows of "
                f"--seq-len {T} in both its 80% calibration and 20% evaluation parts"
            )
        calib = [corpus.stream_windows(stream[:cut], B, T, seed=args.seed + i) for i in range(n)]
        evals = [
            corpus.stream_windows(stream[cut:], B, T, seed=args.seed + 1000 + i) for i in range(n)
        ]
        source = (
            f"{args.data} ({len(docs)} documents, {stream.size} tokens; "
            "80% to score, 20% to evaluate)"
        )
    else:
        window = lambda split, seed: corpus.sample_windows(
            B, T, seed=seed, split=split, encode=tok.encode
        )
        calib = [window("train", args.seed + i) for i in range(n)]
        evals = [window("valid", args.seed + 1000 + i) for i in range(n)]
        source = "stdlib source (train to score, valid to evaluate)"
    print(f"[data] {n} x {B} x {T} tokens of {source}", flush=True)
    data = Data(model, tok, calib, evals, model_dir=md)
    if args.task:
        from ..eval import MultipleChoice, load_task

        data.task = load_task(args.task, tokenizer=tok)
        if isinstance(data.task, MultipleChoice):
            data.task.metric = args.task_metric
        print(f"[task] {data.task.name}: {type(data.task).__name__} of {args.task}", flush=True)
    elif not model.config.causal:
        data.pooling = md.pooling
        print(
            f"[task] {model.config.family} encoder: measuring 1 - cosine of "
            f"{(data.pooling or {}).get('mode', 'mean')}-pooled embeddings to the full "
            "model's",
            flush=True,
        )
    return data
