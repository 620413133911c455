"""Objectives: what a search scores a program by.

An objective is data (batches of rows) plus a jittable measure of a program's logits on
one batch. The protocol is small so that any scorer plugs in:

    name: str; maximize: bool; differentiable: bool
    batches: tuple of dicts, each with "tokens" int [B, T], "mask" float [B, T] (1 = real
             token) and any other arrays [B, ...] the measure reads (targets, labels, ...)
    measure(logits_BTV, batch) -> {"score": [B], "weight": [B], **other [B]}

`score` holds per-row *sums* and `weight` their weights: a program's score on the data is
sum(score) / sum(weight) over all rows (for the loss: summed token NLL over counted
tokens, so the token-mean loss exactly), and per example (`per_example=True`) it is each
row's score / weight. Other keys are reported the same way beside the score.

    search.loss(batches)                                 # next-token loss (minimize)
    search.logits(fn, batches, maximize=True)            # any callable on logits
    search.TaskObjective(dj.eval.load_task("t.jsonl"))   # a task: its own data (minimize)

A task (any object with `.measure(model, programs) -> [K]`, lower is better: the
depthjax.eval tasks, as depthjax.metrics takes them) scores whole programs on its own
data, so it is neither per row (no per_example) nor differentiable (no gate priors).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..core.loss import loss_measure
from ..metrics.batches import as_batches
from ..metrics.coalitions import is_task
from .space import SearchError


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """A measure of logits on batches of rows; lower is better unless `maximize`."""

    name: str
    measure: Callable
    batches: tuple
    maximize: bool = False
    differentiable: bool = False

    def per_row(self, vocab_size: int) -> bool:
        """Whether the measure gives one value per row (so per_example works) rather than
        one per batch."""
        b = self.batches[0]
        spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
        logits = jax.ShapeDtypeStruct(b["tokens"].shape + (vocab_size,), jnp.float32)
        return jax.eval_shape(self.measure, logits, spec)["score"].shape == b["tokens"].shape[:1]

    def key(self, score: float) -> float:
        """Sort key: smaller is better."""
        return -score if self.maximize else score


@dataclasses.dataclass(frozen=True, eq=False)
class TaskObjective:
    """A task as the objective: `task.measure(model, programs)` gives [K] values, lower is
    better, on the task's own data (scored by `evaluate.task_scores`)."""

    task: object
    name: str = ""
    maximize: bool = dataclasses.field(default=False, init=False)
    differentiable: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        if not is_task(self.task):
            raise SearchError(
                f"a task objective needs an object with .measure(model, programs), "
                f"got {self.task!r}"
            )
        if not self.name:
            name = getattr(self.task, "name", None) or type(self.task).__name__
            object.__setattr__(self, "name", name)

    def per_row(self, vocab_size: int) -> bool:
        return False  # one value per program over the task's whole data

    def key(self, score: float) -> float:
        return score


def _rows(batches) -> tuple[dict, ...]:
    """Batches as dicts of numpy arrays: tokens and mask checked by `as_batches`, extra
    arrays kept (their leading axis must be the batch's rows)."""
    items = batches if isinstance(batches, (list, tuple)) else [batches]
    # as_batches checks tokens and mask (and refuses other keys, which metrics ignore)
    plain = lambda b: {k: b[k] for k in ("tokens", "mask") if k in b} if isinstance(b, dict) else b
    checked = as_batches([plain(b) for b in items])
    out = []
    for i, (raw, b) in enumerate(zip(items, checked)):
        row = {"tokens": b.tokens, "mask": b.mask}
        for k, v in raw.items() if isinstance(raw, dict) else ():
            if k in row:
                continue
            v = np.asarray(v)
            if v.ndim == 0 or v.shape[0] != b.tokens.shape[0]:
                raise SearchError(
                    f"batch {i}: {k!r} has shape {v.shape}; objective arrays need "
                    f"a leading axis of the batch's {b.tokens.shape[0]} rows"
                )
            row[k] = v
        out.append(row)
    return tuple(out)


def loss(batches) -> Objective:
    """Mean next-token loss over real tokens (the model's own `metrics.loss`)."""
    return Objective("loss", loss_measure, _rows(batches), maximize=False, differentiable=True)


def logits(
    fn: Callable,
    batches,
    *,
    maximize: bool = False,
    name: str | None = None,
    differentiable: bool = False,
) -> Objective:
    """Any callable on logits: fn(logits_BTV, batch) -> per-row values [B] (each row weighs
    1; per_example works) or one value per batch (batches weigh 1 each), or a dict of such
    arrays with a "score" key (other keys are reported beside it). `batch` is the dict of
    arrays the batch was given as (with "tokens" and "mask"). Objectives of the same `fn`
    share compiled functions."""
    if not callable(fn):
        raise SearchError(f"an objective callable is needed, got {fn!r}")
    label = name or getattr(fn, "__name__", "objective")
    return Objective(
        label, _measure_of(fn), _rows(batches), maximize=maximize, differentiable=differentiable
    )


@functools.lru_cache(maxsize=128)
def _measure_of(fn: Callable) -> Callable:
    """The objective measure of a callable on logits (one per callable: compiled functions
    are cached by the measure's identity)."""

    def as_dict(out):
        return dict(out) if isinstance(out, dict) else {"score": out}

    def measure(logits_BTV, batch):
        out = as_dict(fn(logits_BTV, batch))
        if "score" not in out:
            raise SearchError(f"objective {fn!r} returned keys {sorted(out)}; one must be 'score'")
        if "weight" in out:
            raise SearchError("objective callables return values; 'weight' is reserved")
        out = {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
        shape = out["score"].shape
        for k, v in out.items():
            if v.shape != shape or v.ndim > 1:
                raise SearchError(
                    f"objective output {k!r} has shape {v.shape}; every output "
                    "must be one value per row [B] or one per batch []"
                )
        if not shape:
            out = {k: v[None] for k, v in out.items()}
        return {**out, "weight": jnp.ones_like(out["score"])}

    return measure


def as_objective(objective, batches=None) -> Objective | TaskObjective:
    """An Objective or TaskObjective, a task (see `TaskObjective`), "loss" (with `batches`),
    or a callable on logits (with `batches`)."""
    ready = isinstance(objective, (Objective, TaskObjective))
    if ready or (not callable(objective) and is_task(objective)):
        if batches is not None:
            what = "this Objective" if isinstance(objective, Objective) else "a task"
            raise SearchError(f"batches= is for 'loss' or a callable; {what} has its own data")
        return objective if ready else TaskObjective(objective)
    if batches is None:
        raise SearchError("objective 'loss' or a callable needs batches=")
    if objective == "loss":
        return loss(batches)
    if callable(objective):
        return logits(objective, batches)
    raise SearchError(
        f"objective must be 'loss', a callable on logits, a task (an object with "
        f".measure(model, programs)) or a dj.search.Objective, got {objective!r}"
    )
