"""Budgets: what a program costs, and the most a search may spend.

    Budget.steps(6)                       # active steps (an int budget means this)
    Budget.flops(fraction=0.75, seq_len=512)   # forward FLOPs per token, here 75% of the start's
    Budget.kv_bytes(2**16)                # KV-cache bytes per token of context
    Budget.latency(LatencyModel.measure(model, (8, 512)), fraction=0.8)
    Budget.custom(lambda program: ..., limit, name="my cost")   # program: numpy Program

Costs count what a program runs: a sublayer whose gate is 0 costs nothing (a specialized
or compacted model skips it), a step with any sublayer on is a step.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..core import rows as rows_lib
from ..core.block import step_updates
from ..core.config import ModelConfig
from ..core.flops import sublayer_forward_flops
from ..core.program import Program
from .space import SearchError


def _on(program: Program) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(program.attn) != 0, np.asarray(program.mlp) != 0


def active_steps(program: Program) -> int:
    a, m = _on(program)
    return int(np.sum(a | m))


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Seconds per forward of one attention and one MLP sublayer (and fixed per-step
    overhead). parallel="sum" charges a parallel group the sum of its members (one device
    runs them one after another); "max" charges its slowest member (hardware that runs a
    group concurrently)."""

    attn_s: float
    mlp_s: float
    step_s: float = 0.0
    parallel: str = "sum"

    def __post_init__(self):
        if self.parallel not in ("sum", "max"):
            raise SearchError(
                f"LatencyModel.parallel must be 'sum' or 'max', got {self.parallel!r}"
            )
        if min(self.attn_s, self.mlp_s, self.step_s) < 0:
            raise SearchError("latencies must be non-negative")

    def __call__(self, program: Program) -> float:
        a, m = _on(program)
        per_step = a * self.attn_s + m * self.mlp_s + (a | m) * self.step_s
        if self.parallel == "sum":
            return float(per_step.sum())
        group = np.cumsum(~np.asarray(program.parallel, bool))
        return float(sum(per_step[group == g].max() for g in np.unique(group)))

    @classmethod
    def measure(cls, model, batch_shape: tuple[int, int], repeats: int = 20) -> LatencyModel:
        """Median wall time of one attention and one MLP sublayer of `model` (table row 0)
        on activations [B, T, D], jitted, on the default device."""
        cfg = model.config
        B, T = batch_shape
        x = jnp.ones((B, T, cfg.d_model), cfg.dtype)
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        row = rows_lib.take(model.params["blocks"], 0)  # floats, whatever the storage

        def timed(attn_on: bool) -> float:
            f = jax.jit(
                lambda r, x: sum(step_updates(cfg, r, x, 1.0, 1.0, pos, attn=attn_on, mlp=True))
            )
            jax.block_until_ready(f(row, x))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(f(row, x))
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        # attn=False skips attention's compute statically (a gate of 0 is a run-time cond), so
        # the MLP's time is what is left without attention, and attention's the rest.
        both, mlp_only = timed(True), timed(False)
        return cls(attn_s=max(both - mlp_only, 0.0), mlp_s=mlp_only)


@dataclasses.dataclass(frozen=True)
class Budget:
    """cost(program) -> float in `unit`; a program is within budget when cost <= limit.
    `fraction` sets the limit relative to the start program's cost instead."""

    name: str
    unit: str
    cost_of: Callable[[ModelConfig, Program], float]
    limit: float | None = None
    fraction: float | None = None

    def __post_init__(self):
        if self.limit is not None and self.fraction is not None:
            raise SearchError(f"{self.name} budget: give a limit or a fraction, not both")
        if self.fraction is not None and not self.fraction > 0:
            raise SearchError(f"{self.name} budget: fraction must be > 0, got {self.fraction}")

    def resolve(self, cfg: ModelConfig, start: Program) -> Budget:
        """The budget with an absolute limit (a fraction becomes fraction * start cost)."""
        if self.fraction is None:
            return self
        limit = self.fraction * self.cost_of(cfg, start)
        return dataclasses.replace(self, limit=limit, fraction=None)

    def describe(self) -> str:
        if self.fraction is not None:
            return f"{self.name} <= {self.fraction:g} x start"
        return self.name if self.limit is None else f"{self.name} <= {self.limit:g} {self.unit}"

    # -- the budgets ---------------------------------------------------------------------
    @classmethod
    def steps(cls, limit: int | None = None, *, fraction: float | None = None) -> Budget:
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
            raise SearchError(f"a steps budget must be a positive integer, got {limit!r}")
        return cls("steps", "steps", lambda cfg, p: float(active_steps(p)), limit, fraction)

    @classmethod
    def flops(
        cls, limit: float | None = None, *, fraction: float | None = None, seq_len: int = 512
    ) -> Budget:
        """Forward FLOPs per token at `seq_len` (sublayers that run, plus the output head)."""

        def cost(cfg, p):
            attn, mlp = sublayer_forward_flops(cfg, seq_len)
            a, m = _on(p)
            return float(a.sum() * attn + m.sum() * mlp + 2.0 * cfg.d_model * cfg.vocab_size)

        return cls(f"flops@{seq_len}", "FLOP/token", cost, limit, fraction)

    @classmethod
    def kv_bytes(cls, limit: float | None = None, *, fraction: float | None = None) -> Budget:
        """KV-cache bytes per token of context: keys and values of every step whose
        attention runs (a step with attention off has no cache slot)."""

        def cost(cfg, p):
            per_step = 2 * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
            return float(_on(p)[0].sum() * per_step)

        return cls("kv_bytes", "bytes/token", cost, limit, fraction)

    @classmethod
    def latency(
        cls, model: LatencyModel, limit: float | None = None, *, fraction: float | None = None
    ) -> Budget:
        if not isinstance(model, LatencyModel):
            raise SearchError(f"Budget.latency needs a LatencyModel, got {type(model).__name__}")
        return cls("latency", "s", lambda cfg, p: model(p), limit, fraction)

    @classmethod
    def custom(
        cls,
        cost: Callable[[Program], float],
        limit: float | None = None,
        *,
        fraction: float | None = None,
        name: str = "cost",
        unit: str = "",
    ) -> Budget:
        """Any cost of a program (a `Program` of numpy arrays on the start model's table)."""
        return cls(name, unit, lambda cfg, p: float(cost(p)), limit, fraction)


def as_budget(budget) -> Budget:
    """None (no limit; costs in steps), an int (max active steps) or a Budget."""
    if budget is None:
        return Budget.steps()
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        return Budget.steps(int(budget))
    raise SearchError(
        f"budget must be None, an int (max steps) or a dj.search.Budget, got {budget!r}"
    )
