"""Stitching: a's first steps, a linear stitching map, then b's steps (issue 27 part 3).

    s = dj.depth.stitch(a, b, at=2, calibration=batches)      # a: d_model 64, b: 128
    logits = dj.apply(s, tokens)                               # [B, T, V]
    s.flops_per_token(seq_len)                                 # the cost axis
    dj.generate(s, prompt, 16); dj.save(s, "out"); dj.load("out")

Stitchable networks (Pan et al. 2023) join the first blocks of one pretrained model to the
last blocks of another of a different width through a linear layer, so two anchors give a
family of models between their cost and quality. The map h_b = h_a @ W + c is fitted by
least squares on calibration activations: a's residual after `at` steps against b's
residual at step `resume` on the same tokens (every real token is one sample; float32,
with a bias, and a ridge term `ridge * mean eigenvalue of a's centered covariance` so
that a rank-deficient calibration set still gives a unique map). `fine_tune=n` then trains
the map alone (the parts stay frozen) for n Adam steps on the next-token loss.

The model returned is a `depthjax.core.stitched.Stitched`; see there for its layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core.loss import nll_sums
from ..core.model import DepthModel, default_positions, embed
from ..core.program import is_concrete
from ..core.stitched import Stitched, StitchError, check, check_parts, walk_part
from ..metrics.batches import as_batches
from .edit import select_steps

RIDGE = 1e-6


def _cut(model: DepthModel, lo: int, hi: int, name: str, what: str) -> DepthModel:
    """`model` with its program cut to steps lo..hi-1 (a cut may not split a parallel group)."""
    parallel = np.asarray(model.program.parallel)
    for k in (lo, hi):
        if 0 < k < model.depth and parallel[k]:
            raise StitchError(
                f"{what}={k} splits a parallel group of model {name} (step {k} reads the same "
                f"input as step {k - 1}); cut at a group boundary"
            )
    return select_steps(model, np.arange(lo, hi))


def _point(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise StitchError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    return int(value)


def _check_models(a, b) -> None:
    for name, m in (("a", a), ("b", b)):
        if not isinstance(m, DepthModel):
            raise StitchError(f"model {name} must be a DepthModel, got {type(m).__name__}")
        if m.program.block.ndim != 1 or not is_concrete(m.program):
            raise StitchError(f"model {name} needs one concrete program to be cut")
        if "final_adapter" in m.params and name == "a":
            raise StitchError(
                "model a has a final recovery adapter (it acts after a's last step, which a "
                "stitch does not reach); fold or drop it first"
            )


def stitch(
    a: DepthModel,
    b: DepthModel,
    at: int,
    resume: int | None = None,
    calibration=None,
    *,
    ridge: float = RIDGE,
    fine_tune: int = 0,
    learning_rate: float = 1e-3,
    map=None,  # noqa: A002 (the stitching map's name in the paper)
) -> Stitched:
    """a's embedding and first `at` steps, the stitching map, b's steps from `resume` on,
    b's final norm and head.

    at: 1..a.depth; resume: 0..b.depth-1, default the same relative depth,
    round(at * b.depth / a.depth) rounded half up and at most b.depth - 1. The map is
    `map=(W, c)` if given, else fitted by least squares on `calibration` (batches as
    metrics take them: token arrays or {"tokens", "mask"} dicts), else the identity
    (models of one width only). fine_tune: Adam steps (at `learning_rate`) on the
    next-token loss of the calibration batches, training the map only.
    """
    _check_models(a, b)
    check_parts(a, b)
    if fine_tune and calibration is None:
        raise StitchError("fine_tune needs calibration= batches to train the map on")
    at = _point(at, "at", 1, a.depth)
    if resume is None:
        resume = min(int(np.floor(at * b.depth / a.depth + 0.5)), b.depth - 1)
    resume = _point(resume, "resume", 0, b.depth - 1)
    front, back = _cut(a, 0, at, "a", "at"), _cut(b, resume, b.depth, "b", "resume")
    Da, Db = a.config.d_model, b.config.d_model
    if map is not None:
        W, c = (jnp.asarray(x, jnp.float32) for x in map)
    elif calibration is not None:
        W, c = fit_map(a, b, at, resume, calibration, ridge=ridge)
    elif Da == Db:
        W, c = jnp.eye(Da, dtype=jnp.float32), jnp.zeros((Db,), jnp.float32)
    else:
        raise StitchError(
            f"models of widths {Da} and {Db} need a stitching map: pass calibration= "
            "(batches to fit it on) or map=(W, c)"
        )
    out = Stitched(front, back, W, c, at, resume)
    check(out)
    if fine_tune:
        out = tune_map(out, calibration, fine_tune, learning_rate)
    return out


# -- least squares ---------------------------------------------------------------------
def _residual(model: DepthModel, tokens_BT, mask_BT, walk: bool):
    """The residual after `model`'s whole program [B, T, D] (walk=False: the embedding)."""
    positions = default_positions(tokens_BT)
    x_BTD = embed(model, tokens_BT, positions)
    return walk_part(model, x_BTD, positions_BT=positions, mask_BT=mask_BT) if walk else x_BTD


@functools.partial(jax.jit, static_argnames=("back_walks",))
def _moments(front, back, tokens_BT, mask_BT, shift_x, shift_y, *, back_walks: bool):
    """Sums over real tokens of x - shift_x, y - shift_y and their products, float32:
    (n, sx [Da], sy [Db], sxx [Da, Da], sxy [Da, Db])."""
    x = _residual(front, tokens_BT, mask_BT, True).astype(jnp.float32) - shift_x
    y = _residual(back, tokens_BT, mask_BT, back_walks).astype(jnp.float32) - shift_y
    w = mask_BT.astype(jnp.float32)[..., None]
    x, y = (x * w).reshape(-1, x.shape[-1]), (y * w).reshape(-1, y.shape[-1])
    mm = functools.partial(jnp.matmul, precision="highest")
    return w.sum(), x.sum(0), y.sum(0), mm(x.T, x), mm(x.T, y)


def fit_map(
    a: DepthModel, b: DepthModel, at: int, resume: int, calibration, *, ridge: float = RIDGE
) -> tuple[jax.Array, jax.Array]:
    """(W [D_a, D_b], c [D_b]) float32 minimizing the mean over real calibration tokens of
    ||residual_a[at] @ W + c - residual_b[resume]||^2 + lambda ||W||^2, with lambda = ridge
    times the mean eigenvalue of a's centered covariance (the bias is not penalized)."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise StitchError(f"ridge must be a number >= 0, got {ridge!r}")
    data = as_batches(calibration, a.config.vocab_size)
    front = select_steps(a, np.arange(at))
    back = select_steps(b, np.arange(max(resume, 1)))  # resume 0: the embedding, no step
    Da, Db = a.config.d_model, b.config.d_model

    def moments(batch, shift_x, shift_y):
        return _moments(
            front, back, batch.tokens, batch.mask, shift_x, shift_y, back_walks=resume > 0
        )

    # Sums are taken around the first batch's means, so that float32 loses little to
    # cancellation when the covariance is formed from them.
    n, sx, sy, _, _ = moments(data[0], jnp.zeros(Da, jnp.float32), jnp.zeros(Db, jnp.float32))
    shift_x, shift_y = sx / n, sy / n
    total = None
    for batch in data:
        got = moments(batch, shift_x, shift_y)
        total = got if total is None else tuple(t + g for t, g in zip(total, got))
    n, sx, sy, sxx, sxy = total
    mx, my = sx / n, sy / n
    cxx = sxx / n - jnp.outer(mx, mx)
    cxy = sxy / n - jnp.outer(mx, my)
    lam = ridge * jnp.trace(cxx) / Da
    W = jnp.linalg.solve(cxx + lam * jnp.eye(Da, dtype=jnp.float32), cxy)
    c = (shift_y + my) - jnp.matmul(shift_x + mx, W, precision="highest")
    return W.astype(jnp.float32), c.astype(jnp.float32)


# -- fine-tuning the map ---------------------------------------------------------------
def tune_map(s: Stitched, calibration, steps: int, learning_rate: float = 1e-3) -> Stitched:
    """`s` with its map trained for `steps` Adam steps on the next-token loss of the
    calibration batches (cycled); the parts stay frozen."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise StitchError(f"fine_tune must be a number of steps >= 0, got {steps!r}")
    if not learning_rate > 0:
        raise StitchError(f"learning_rate must be > 0, got {learning_rate!r}")
    data = as_batches(calibration, s.config.vocab_size)
    Wc = (s.W, s.c)
    state = _adam(learning_rate).init(Wc)
    for t in range(int(steps)):
        batch = data[t % len(data)]
        Wc, state = _tune_step(s, Wc, state, batch.tokens, batch.mask)
    return s.replace(W=Wc[0], c=Wc[1])


# The learning rate lives in the optimizer state, so one compile serves every rate.
_adam = optax.inject_hyperparams(optax.adam)


@jax.jit
def _tune_step(s: Stitched, Wc, state, tokens_BT, mask_BT):
    def loss(Wc):
        logits = s.replace(W=Wc[0], c=Wc[1]).apply(tokens_BT, mask=mask_BT)
        total, count = nll_sums(logits, tokens_BT, mask_BT)
        return total / count

    updates, state = _adam(learning_rate=0.0).update(jax.grad(loss)(Wc), state, Wc)
    return optax.apply_updates(Wc, updates), state
