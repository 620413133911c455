"""Random controls for pruning: what removing n units *at random* does, as a distribution.

A metric's pruning is only worth something against what chance gives, and one random
draw is no baseline (it can land on the metric's own choice). `random_pruning` measures
the model without each of many distinct random subsets of n units (every subset when
there are no more than asked for), and `random_removal_curves` the measure along many
random removal orders; either way all programs go through `coalition_measures` as one
batch (one compiled function, no weights copied).

Subsets are drawn from the units still on (as `dj.prune` chooses), by
`numpy.random.default_rng(seed)`: the same seed gives the same subsets.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from ..core.model import DepthModel
from .coalitions import _unique_measures, active_units, coalition_measures, measure_name, n_units
from .scores import MetricError


@dataclasses.dataclass(frozen=True)
class RandomControl:
    """The measure of the model without each of K random subsets of n units.

    subsets: int [K, n], the removed unit indices of each subset (sorted); values: float64
    [K], the measure without it; exhaustive: every subset of n units still on was
    evaluated (then `mean` is the exact expectation of random pruning)."""

    unit: str
    n: int
    subsets: np.ndarray
    values: np.ndarray
    exhaustive: bool
    measure: str = "loss"

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1) over the subsets; 0 for a single subset."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def min(self) -> float:
        return float(np.min(self.values))

    @property
    def max(self) -> float:
        return float(np.max(self.values))

    def describe(self, fmt: str = ".4f") -> str:
        """'2.3012 ± 0.0410 (min 2.2500, max 2.3800) over 16 random subsets'."""
        K = len(self.values)
        over = f"all {K} subsets" if self.exhaustive else f"{K} random subsets"
        return (
            f"{self.mean:{fmt}} ± {self.std:{fmt}} (min {self.min:{fmt}}, "
            f"max {self.max:{fmt}}) over {over}"
        )

    def to_dict(self) -> dict:
        return {
            "unit": self.unit,
            "n": self.n,
            "measure": self.measure,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "exhaustive": self.exhaustive,
            "subsets": self.subsets.tolist(),
            "values": self.values.tolist(),
        }


def _candidates(model: DepthModel, unit: str, n: int) -> tuple[np.ndarray, int]:
    """(the units still on, how many of them may go), n checked as `dj.prune` would."""
    on = np.flatnonzero(active_units(model, unit))
    limit = len(on) - 1 if unit == "block" else len(on)  # a program keeps one step
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise MetricError(f"n={n!r}: can remove 1..{limit} of the {len(on)} {unit} units still on")
    return on, limit


def _count(name: str, k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise MetricError(f"{name} must be an integer >= 2 (a spread needs two), got {k!r}")
    return int(k)


def random_subsets(on: np.ndarray, n: int, k: int, seed: int) -> tuple[np.ndarray, bool]:
    """(int [K, n] distinct sorted subsets of `on`, exhaustive): all C(len(on), n) when
    that is at most k, else k distinct ones drawn uniformly in draw order."""
    if math.comb(len(on), n) <= k:
        return np.array(list(itertools.combinations(on, n)), np.int64).reshape(-1, n), True
    rng = np.random.default_rng(seed)
    seen: dict[tuple, None] = {}  # insertion-ordered set
    while len(seen) < k:
        seen.setdefault(tuple(np.sort(rng.choice(on, n, replace=False)).tolist()))
    return np.array(list(seen), np.int64), False


def random_pruning(
    model: DepthModel,
    batches=None,
    n: int = 1,
    unit: str = "block",
    num_subsets: int = 16,
    seed: int = 0,
    measure="loss",
) -> RandomControl:
    """The measure after removing n random units (of those still on), over `num_subsets`
    distinct random subsets (all of them when there are fewer), evaluated as one batch of
    programs. measure as in `coalition_measures` ("loss", "logit", "hidden" or a task)."""
    n_all = n_units(model, unit)
    on, _ = _candidates(model, unit, n)
    subsets, exhaustive = random_subsets(on, n, _count("num_subsets", num_subsets), seed)
    keep = np.ones((len(subsets), n_all), np.int8)
    np.put_along_axis(keep, subsets, 0, axis=1)
    values = coalition_measures(model, batches, unit, keep, measure, f"random {unit} pruning")
    return RandomControl(unit, int(n), subsets, values, exhaustive, measure_name(measure))


def random_removal_curves(
    model: DepthModel,
    batches=None,
    unit: str = "block",
    num_orders: int = 16,
    max_units: int | None = None,
    seed: int = 0,
    measure="loss",
) -> np.ndarray:
    """float64 [num_orders, max_units + 1]: the measure after removing k = 0..max_units
    units along each of `num_orders` random orders of the units still on (the control for
    `removal_curve`); all prefixes in one batch, each distinct coalition evaluated once."""
    on, limit = _candidates(model, unit, 1)
    K = limit if max_units is None else max_units
    if not 0 <= K <= limit:
        raise MetricError(f"max_units must be in 0..{limit}, got {K}")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(on) for _ in range(_count("num_orders", num_orders))]
    keep = np.ones((len(orders), K + 1, n_units(model, unit)), np.int8)
    for o, order in enumerate(orders):
        for k in range(1, K + 1):
            keep[o, k:, order[k - 1]] = 0
    flat = keep.reshape(-1, keep.shape[-1])
    values = _unique_measures(model, batches, unit, flat, measure, f"random {unit} orders")
    return values.reshape(len(orders), K + 1)
