"""Scores: one number per unit (step, sublayer or span), higher = more important."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import DepthjaxError

UNITS = ("block", "attn", "mlp", "sublayer", "span")


class MetricError(DepthjaxError):
    """Metric arguments or batches that cannot be scored (bad tokens, units, counts)."""


@dataclasses.dataclass(frozen=True)
class Scores:
    """values[i] scores unit i. For unit="sublayer" the units are attn_0..attn_{S-1} then
    mlp_0..mlp_{S-1}; for "span" unit i is the span of steps starting at i. `extra` holds
    companion numbers (e.g. residual_norm [depth+1], always beside cosine metrics)."""

    name: str
    unit: str
    values: np.ndarray
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise MetricError(f"unit must be one of {UNITS}, got {self.unit!r}")
        object.__setattr__(self, "values", np.asarray(self.values, np.float64))

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __len__(self):
        return len(self.values)

    def order(self) -> np.ndarray:
        """Unit indices from least to most important (stable)."""
        return np.argsort(self.values, kind="stable")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "unit": self.unit,
            "values": self.values.tolist(),
            **{k: np.asarray(v).tolist() for k, v in self.extra.items()},
        }
