"""dj.prune: remove the n least important units by a metric's scores.

Blocks are dropped from the program (the table is shared, nothing is copied); attention,
MLP or jointly ranked sublayers are gated off (depth unchanged; `depth.compact` removes
steps left with both gates 0). Units already off are never chosen again.

Without scores, `measure=` (a depthjax.eval task, or "loss"/"logit"/"hidden" with `batches=`) ranks
units by leave-one-out ablation of that measure: the units whose removal costs the task
least go first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import depth, progress
from ..core.model import DepthModel
from ..errors import DepthjaxError
from ..metrics.coalitions import active_units
from ..metrics.scores import Scores


class PruneError(DepthjaxError):
    """A pruning request that the model or the scores cannot satisfy."""


def _remove(model: DepthModel, units: np.ndarray, unit: str) -> DepthModel:
    S = model.depth
    if unit == "block":
        return depth.drop(model, units)
    if unit == "attn":
        return depth.drop_sublayers(model, attn=units)
    if unit == "mlp":
        return depth.drop_sublayers(model, mlp=units)
    return depth.drop_sublayers(model, attn=units[units < S], mlp=units[units >= S] - S)


def choose(model: DepthModel, scores, n: int, unit: str) -> np.ndarray:
    """Indices of the n lowest-scored units that are still on (ties: earlier first)."""
    values = np.asarray(scores, np.float64)
    active = active_units(model, unit)
    if values.shape != active.shape:
        raise PruneError(
            f"scores for unit={unit!r} must have {len(active)} values, got {values.shape}"
        )
    candidates = np.flatnonzero(active)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= len(candidates):
        raise PruneError(
            f"n={n!r}: can remove 0..{len(candidates)} {unit} units "
            f"({len(candidates)} are still on)"
        )
    if unit == "block" and n == len(candidates):
        raise PruneError(f"n={n} would remove every step")
    order = candidates[np.argsort(values[candidates], kind="stable")]
    return np.sort(order[:n])


def prune(
    model: DepthModel,
    scores: Scores | np.ndarray | None,
    n: int,
    unit: str | None = None,
    *,
    metric: Callable[[DepthModel], Scores] | None = None,
    measure=None,
    batches=None,
    iterative: bool = False,
) -> DepthModel:
    """Remove the n least important units.

    scores: a metric's Scores (its unit is used unless `unit` is given) or an array.
    unit: "block" | "attn" | "mlp" | "sublayer" (joint ranking of all 2*depth sublayers;
    `metrics.module_similarity` is the criterion of "What Matters in Transformers?").
    measure: without scores or metric, rank by leave-one-out ablation of this measure
    (a task, or "loss"/"logit"/"hidden" on `batches`). iterative=True re-scores with
    `metric(model)` after each removal (scores may then be None).
    """
    unit = unit or getattr(scores, "unit", None) or getattr(metric, "unit", None)
    if unit not in ("block", "attn", "mlp", "sublayer"):
        raise PruneError(
            "prune needs unit='block'|'attn'|'mlp'|'sublayer' (or Scores that carry one)"
        )
    if measure is not None and metric is None:
        from ..metrics import ablation

        metric = lambda m: ablation(m, batches, unit=unit, measure=measure)
    if not iterative:
        if scores is None:
            scores = metric(model) if metric else None
        if scores is None:
            raise PruneError("prune needs scores (or a metric to compute them)")
        return _remove(model, choose(model, scores, n, unit), unit)
    if metric is None:
        raise PruneError("iterative pruning re-scores after each removal: pass metric=")
    choose(model, np.zeros(len(active_units(model, unit))), n, unit)  # validates n up front
    for _ in progress.track(range(n), f"iterative pruning ({unit})"):
        model = _remove(model, choose(model, metric(model), 1, unit), unit)
    return model
