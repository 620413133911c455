"""Recurrent depth: a prelude, a tied core span looped n times, a coda (Huginn, Geiping et
al. 2025; looped transformers; Mixture-of-Recursions' shared block).

    model, rec = recurrent.attach(model, start=2, stop=4)     # steps 2..3 are the core
    logits = recurrent.apply(model, rec, tokens, loops=4)       # == dj.depth.repeat(..., 4)
    n = recurrent.sample_loops(rng, mean=4, max_loops=12)       # a count per training step
    total, stats = recurrent.loss(model, rec, tokens, jnp.int32(n), backprop=3)
    logits, loops_BT = recurrent.apply_adaptive(model, rec, tokens, tol=0.05, max_loops=16)

The program is read as prelude = steps [0, start), core = steps [start, stop) and coda =
steps [stop, depth); the core runs `loops` times. Because the core's rows are shared,
every loop count is the same parameters, and a traced `loops` runs every count through one
compiled function.

Training draws n per step from Huginn's log-normal Poisson (`sample_loops`): tau ~
N(log(mean - 1) - sigma^2 / 2, sigma), n = 1 + Poisson(exp(tau)), so E[n] = mean (before
clipping at max_loops); most draws sit near the mean with a heavy tail of long loops.
Truncated backprop (`backprop=k`) differentiates only the last k loops: the first n - k
run under stop_gradient in a `fori_loop` (no activations kept), the last k in a scan whose
loops past n are skipped with `lax.cond`, so memory is bounded by k whatever n is drawn.

inject=True adds Huginn's input injection: each loop reads s + [s, e] @ A, where e is the
prelude's output and A [2D, D] (params["recurrence"]["inject"]) starts at 0, so a fresh
model still equals the static looped program; it lets the prelude learn when loops > k.

At inference `apply_adaptive` gives every token its own loop count: a token stops once its
state changes by less than `tol` (relative L2, ||s_j - s_{j-1}|| / ||s_j||) after at least
`min_loops`, or at `max_loops`. A stopped token's residual is frozen, and later loops of
other tokens attend to the keys of the last loop it ran (depthjax.adaptive.caches.
LatestView). recurrent_decode generates with the same rule, batching rows at different
loop counts together.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core.loss import nll_sums
from ..core.model import DepthModel, output_head
from .caches import LatestView
from .common import AdaptiveError, check_inputs, embed, walk_views


@dataclasses.dataclass(frozen=True)
class Recurrence:
    """The looped span: core = program steps [start, stop). Static (hashable)."""

    start: int
    stop: int
    inject: bool = False

    def check(self, model: DepthModel) -> None:
        if not (
            isinstance(self.start, int)
            and isinstance(self.stop, int)
            and 0 <= self.start < self.stop <= model.depth
        ):
            raise AdaptiveError(
                f"the looped span [start={self.start}, stop={self.stop}) must "
                f"be a non-empty range of the program's {model.depth} steps"
            )
        if self.inject and "inject" not in model.params.get("recurrence", {}):
            raise AdaptiveError(
                "inject=True needs params['recurrence']['inject']: use "
                "recurrent.attach(model, start, stop, inject=True)"
            )


def attach(model: DepthModel, start: int, stop: int, *, inject: bool = False):
    """(model, Recurrence); with inject=True the model gains a zero injection matrix."""
    rec = Recurrence(int(start), int(stop), bool(inject))
    if inject:
        D = model.config.d_model
        params = {**model.params, "recurrence": {"inject": jnp.zeros((2 * D, D))}}
        model = model.replace(params=params)
    rec.check(model)
    return model, rec


def check_loops(loops, what: str = "loops") -> None:
    if isinstance(loops, (int, np.integer)) and not isinstance(loops, bool):
        if loops < 1:
            raise AdaptiveError(f"{what} must be >= 1, got {loops}")
    elif (
        not isinstance(loops, jax.Array)
        or loops.ndim
        or not jnp.issubdtype(loops.dtype, jnp.integer)
    ):
        raise AdaptiveError(f"{what} must be a positive int or an int scalar array, got {loops!r}")
    elif not isinstance(loops, jax.core.Tracer) and int(loops) < 1:
        raise AdaptiveError(f"{what} must be >= 1, got {int(loops)}")


def sample_loops(
    rng: np.random.Generator, mean: float, *, sigma: float = 0.5, max_loops: int | None = None
) -> int:
    """One training loop count from the log-normal Poisson with E[n] = mean (module doc)."""
    if not mean >= 1:
        raise AdaptiveError(f"mean loop count must be >= 1, got {mean}")
    if max_loops is not None and max_loops < 1:
        raise AdaptiveError(f"max_loops must be >= 1, got {max_loops}")
    if mean == 1:
        return 1
    tau = rng.normal(np.log(mean - 1) - sigma**2 / 2, sigma)
    n = 1 + int(rng.poisson(np.exp(tau)))
    return n if max_loops is None else min(n, max_loops)


def loop_distribution(
    mean: float,
    *,
    sigma: float = 0.5,
    max_loops: int | None = None,
    samples: int = 100_000,
    seed: int = 0,
) -> np.ndarray:
    """Empirical probabilities of n = 1..max (index n-1) under `sample_loops`."""
    rng = np.random.default_rng(seed)
    draws = np.array(
        [sample_loops(rng, mean, sigma=sigma, max_loops=max_loops) for _ in range(samples)]
    )
    return np.bincount(draws)[1:] / samples


class _Parts:
    """The prelude / core / coda of a model and the one-loop function of its core."""

    def __init__(self, model: DepthModel, rec: Recurrence, positions_BT):
        rec.check(model)
        self.model, self.rec, self.positions = model, rec, positions_BT
        self.spans = {
            "prelude": (0, rec.start),
            "core": (rec.start, rec.stop),
            "coda": (rec.stop, model.depth),
        }

    def at(self, positions_BT) -> _Parts:
        """The same parts for tokens at other positions (decoding)."""
        return _Parts(self.model, self.rec, positions_BT)

    def run(self, part: str, x, params=None, views=None):
        """Walk one part on x; `params` replaces the model's (e.g. stop-gradiented)."""
        params = self.model.params if params is None else params
        lo, hi = self.spans[part]
        cut = lambda a: a[lo:hi]
        return walk_views(
            self.model.config,
            params["blocks"],
            jax.tree.map(cut, self.model.program),
            jax.tree.map(cut, params.get("steps")),
            x,
            self.positions,
            views=views,
        )

    def loop(self, s, e, params=None, views=None):
        """One pass of the core on state s (prelude output e, for injection)."""
        params = self.model.params if params is None else params
        if self.rec.inject:
            a = params["recurrence"]["inject"].astype(s.dtype)
            s = s + jnp.concatenate([s, e], -1) @ a
        return self.run("core", s, params, views)


def _loop_n(parts: _Parts, s, e, loops, backprop: int):
    """Apply the core `loops` times; gradients flow through the last `backprop` only."""
    n = jnp.asarray(loops, jnp.int32)
    n_free = jnp.maximum(n - backprop, 0)

    def free(s):  # loops without gradients: nothing is kept for the backward pass
        params, s, e_ = jax.lax.stop_gradient((parts.model.params, s, e))
        return jax.lax.fori_loop(0, n_free, lambda _, s: parts.loop(s, e_, params)[0], s)

    s = jax.lax.cond(n_free > 0, free, lambda s: s, s)

    def tracked(s, i):
        return jax.lax.cond(i < n - n_free, lambda s: parts.loop(s, e)[0], lambda s: s, s), None

    s, _ = jax.lax.scan(tracked, s, jnp.arange(backprop))
    return s


def apply(model: DepthModel, rec: Recurrence, tokens_BT, loops, *, backprop: int | None = None):
    """Logits [B, T, V] with the core looped `loops` times (an int, or an int32 scalar array:
    one compile for every count). backprop=k differentiates only the last k loops; None
    differentiates all of them and then needs `loops` to be a Python int."""
    check_loops(loops)
    if backprop is None:
        if not isinstance(loops, (int, np.integer)):
            raise AdaptiveError(
                "backprop=None (through every loop) needs loops as a Python "
                "int; pass backprop=k to truncate with a traced loop count"
            )
        backprop = int(loops)
    check_loops(backprop, "backprop")
    check_inputs(model, tokens_BT)
    rec.check(model)
    return _apply(model, tokens_BT, jnp.asarray(loops, jnp.int32), rec=rec, backprop=int(backprop))


@functools.partial(jax.jit, static_argnames=("rec", "backprop"))
def _apply(model, tokens_BT, loops, *, rec, backprop):
    x_BTD, positions_BT = embed(model, tokens_BT)
    parts = _Parts(model, rec, positions_BT)
    s, _ = parts.run("prelude", x_BTD)
    s = _loop_n(parts, s, s, loops, backprop)
    s, _ = parts.run("coda", s)
    return output_head(model.config, model.params, s)


def loss(model: DepthModel, rec: Recurrence, tokens_BT, loops, *, backprop: int | None = None):
    """Mean next-token loss at `loops` loops. Returns (loss, stats dict)."""
    total, count = nll_sums(apply(model, rec, tokens_BT, loops, backprop=backprop), tokens_BT)
    value = total / jnp.maximum(count, 1.0)
    return value, {"lm_loss": value}


def static_program(model: DepthModel, rec: Recurrence, loops: int) -> DepthModel:
    """The equivalent static model: the core span repeated `loops` times (no injection)."""
    from ..depth import repeat

    if rec.inject:
        raise AdaptiveError("a model with input injection has no static-program equivalent")
    return repeat(model, list(range(rec.start, rec.stop)), int(loops))


def check_adaptive(tol, max_loops, min_loops) -> None:
    check_loops(max_loops, "max_loops")
    check_loops(min_loops, "min_loops")
    if min_loops > max_loops:
        raise AdaptiveError(f"min_loops={min_loops} exceeds max_loops={max_loops}")
    if not tol >= 0:
        raise AdaptiveError(f"tol must be >= 0 (relative change of the state), got {tol}")


def relative_change(new_BTD, old_BTD):
    """||new - old|| / ||new|| per token, float32 [B, T]."""
    d = (new_BTD - old_BTD).astype(jnp.float32)
    n = new_BTD.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(d * d, -1) / jnp.maximum(jnp.sum(n * n, -1), 1e-30))


def adaptive_loops(parts: _Parts, s, *, tol, max_loops, min_loops, record=None):
    """Loop the core with a loop count per token (module doc). record: optional decoding
    caches (k, v) [Sc, B, S, J, K, Dh] that receive every loop's keys.

    Returns (s, loops_BT int32, record)."""
    cfg = parts.model.config
    B, T, _ = s.shape
    Sc = parts.rec.stop - parts.rec.start
    kv = jnp.zeros((Sc, B, T, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
    e = s

    def body(state):
        j, s, active, n, k, v, rk, rv = state
        views = LatestView(
            k,
            v,
            jnp.broadcast_to(active, (Sc, B, T)),
            rk,
            rv,
            jnp.full((Sc,), j, jnp.int32) if rk is not None else None,
        )
        s_new, views = parts.loop(s, e, views=views)
        j = j + 1
        s_new = jnp.where(active[..., None], s_new, s)
        settled = (relative_change(s_new, s) < tol) & (j >= min_loops)
        n = jnp.where(active, j, n)
        active = active & ~settled & (j < max_loops)
        return j, s_new, active, n, views.k, views.v, views.record_k, views.record_v

    rk, rv = (None, None) if record is None else record
    state = (
        jnp.zeros((), jnp.int32),
        s,
        jnp.ones((B, T), bool),
        jnp.zeros((B, T), jnp.int32),
        kv,
        kv,
        rk,
        rv,
    )
    _, s, _, n, _, _, rk, rv = jax.lax.while_loop(lambda st: jnp.any(st[2]), body, state)
    return s, n, (rk, rv)


def apply_adaptive(
    model: DepthModel, rec: Recurrence, tokens_BT, *, tol: float, max_loops: int, min_loops: int = 1
):
    """Per-token loop counts by convergence. Returns (logits [B, T, V], loops int32 [B, T])."""
    check_adaptive(tol, max_loops, min_loops)
    check_inputs(model, tokens_BT)
    rec.check(model)
    return _apply_adaptive(model, rec, tokens_BT, jnp.float32(tol), int(max_loops), int(min_loops))


def _apply_adaptive_impl(model, rec, tokens_BT, tol, max_loops, min_loops):
    x_BTD, positions_BT = embed(model, tokens_BT)
    parts = _Parts(model, rec, positions_BT)
    s, _ = parts.run("prelude", x_BTD)
    s, n, _ = adaptive_loops(parts, s, tol=tol, max_loops=max_loops, min_loops=min_loops)
    s, _ = parts.run("coda", s)
    return output_head(model.config, model.params, s), n


_apply_adaptive = jax.jit(_apply_adaptive_impl, static_argnames=("rec", "max_loops", "min_loops"))
