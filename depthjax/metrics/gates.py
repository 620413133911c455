"""Gradient attribution of depth: gates are floats, so the loss is a smooth function of
all 2*depth sublayer gates g = [attn_0..attn_{S-1}, mlp_0..mlp_{S-1}].

* `gate_gradient`: dL/dg from one backward pass per batch. Its Scores are the
  first-order Taylor estimate of the loss rise when a unit is removed (its gate goes
  from g_i to 0): -g_i * dL/dg_i, comparable to leave-one-out ablation and cheap at any
  depth (one backward instead of 2*depth forwards).
* `gate_interactions`: the Hessian d2L/dg_i dg_j [2S, 2S] (forward-over-reverse,
  chunked Hessian-vector products). Off the diagonal it says which pairs of sublayers
  are redundant together (positive: removing both hurts more than the sum of removing
  each, as when either one can stand in for the other; to second order).
* `taylor_estimate`: the loss change of removing any set of units, to first or second
  order, from those two (a search prior; see depthjax.search).

Both accept any objective measure (`measure=`, see depthjax.search.objective); the
default is the next-token loss on the batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core.loss import loss_measure, require_causal
from ..core.model import DepthModel, apply
from .batches import as_batches
from .scores import MetricError, Scores


def _gates(model: DepthModel) -> jax.Array:
    return jnp.concatenate([model.program.attn, model.program.mlp])


def _batch_fn(model: DepthModel, batch: dict, measure):
    """g [2S] -> (sum of the measure's per-row scores, sum of their weights) on the batch."""
    S = model.depth

    def f(g):
        m = model.replace(program=model.program.replace(attn=g[:S], mlp=g[S:]))
        out = measure(apply(m, batch["tokens"], mask=batch["mask"]), batch)
        return jnp.sum(out["score"]), jnp.sum(out["weight"])

    return f


@functools.partial(jax.jit, static_argnames=("measure",))
def _grad_sums(model, batch, *, measure):
    (value, weight), grad = jax.value_and_grad(_batch_fn(model, batch, measure), has_aux=True)(
        _gates(model)
    )
    return value, weight, grad


@functools.partial(jax.jit, static_argnames=("measure", "chunk"))
def _hessian_sums(model, batch, *, measure, chunk):
    """(value, weight, gradient, Hessian) sums: Hessian columns are forward-over-reverse
    products with unit vectors, whose primal outputs are the value and gradient (one
    compiled function for all of them)."""
    value_and_grad = jax.value_and_grad(_batch_fn(model, batch, measure), has_aux=True)
    g0 = _gates(model)
    column = lambda v: jax.jvp(value_and_grad, (g0,), (v,))
    ((value, weight), grad), (_, hess) = jax.lax.map(
        column, jnp.eye(g0.size, dtype=g0.dtype), batch_size=chunk
    )
    return value[0], weight[0], grad[0], hess


def _dicts(batches) -> list[dict]:
    if (
        isinstance(batches, (list, tuple))
        and batches
        and isinstance(batches[0], dict)
        and "mask" in batches[0]
    ):
        return list(batches)  # already objective rows (depthjax.search)
    return [{"tokens": b.tokens, "mask": b.mask} for b in as_batches(batches)]


def gate_derivatives(model: DepthModel, batches, measure=loss_measure, *, hessian: bool = False):
    """(mean measure, dL/dg [2S], d2L/dg2 [2S, 2S] or None) over the batches, where the
    mean is sum(score) / sum(weight) over every row (the token-mean loss by default)."""
    if measure is loss_measure:
        require_causal(model, "the gate gradient of the loss", MetricError)
    value = weight = 0.0
    grad = hess = None
    for b in _dicts(batches):
        if hessian:
            v, w, g, h = _hessian_sums(model, b, measure=measure, chunk=min(8, 2 * model.depth))
            hess = h if hess is None else hess + h
        else:
            v, w, g = _grad_sums(model, b, measure=measure)
        value, weight = value + v, weight + w
        grad = g if grad is None else grad + g
    weight = float(weight)
    out = (float(value) / weight, np.asarray(grad, np.float64) / weight)
    if not hessian:
        return out + (None,)
    hess = np.asarray(hess, np.float64) / weight
    return out + (0.5 * (hess + hess.T),)  # symmetric up to float rounding; make it exact


def gate_gradient(model: DepthModel, batches, measure=loss_measure) -> Scores:
    """Per sublayer (unit "sublayer": attn_0.., mlp_0..): -g * dL/dg, the first-order
    estimate of the loss rise when the sublayer is switched off. extra["grad"] is dL/dg
    itself, extra["loss"] the loss at the model's gates.

    measure: an objective measure (logits_BTV, batch) -> {"score": [B], "weight": [B]}
    (depthjax.search.objective); with one other than the loss, batches are dicts with
    "tokens", "mask" and the arrays it reads (a search Objective's .batches)."""
    loss, grad, _ = gate_derivatives(model, batches, measure)
    g = np.asarray(_gates(model), np.float64)
    return Scores("gate_gradient", "sublayer", -g * grad, {"grad": grad, "loss": loss})


def gate_interactions(model: DepthModel, batches, measure=loss_measure) -> np.ndarray:
    """The Hessian H of the loss with respect to the 2*depth gates [2S, 2S] (attn_0..,
    mlp_0..) at the model's gates, symmetric; `measure` as in `gate_gradient`.

    With gates at 1, H[i, j] is the local version of the ablation second difference
    L(1,1) - L(1,0) - L(0,1) + L(0,0) of units i and j (the other gates as they are).
    That difference is the *mean* of d2L/dg_i dg_j over the unit square of the two gates,
    H[i, j] its value at the corner (1, 1): the two are equal exactly when the mixed
    derivative is constant on the square, i.e. the loss is at most bilinear in the pair
    (L = f(g_i) + h(g_j) + c g_i g_j), e.g. both sublayers read one input (a parallel
    group, or a GPT-J block's attention and MLP) and the measure is quadratic in logits
    that are linear in the last residual (no final norm). In general they differ: when
    one sublayer reads the other's output, and through the final norm and the softmax of
    the loss, H is a second-order estimate of the interaction, good for small gate
    changes and rough for switching units off."""
    return gate_derivatives(model, batches, measure, hessian=True)[2]


def taylor_estimate(gates, grad, keep, hessian=None) -> np.ndarray:
    """Estimated change of the measure [K] when units with keep[k] == 0 are switched off
    (their gates go to 0): g.d (+ d.H.d / 2 with the Hessian), d = (keep - 1) * gates."""
    keep = np.atleast_2d(np.asarray(keep, np.float64))
    d = (keep - 1.0) * np.asarray(gates, np.float64)
    est = d @ np.asarray(grad, np.float64)
    if hessian is not None:
        est = est + 0.5 * np.einsum("ki,ij,kj->k", d, hessian, d)
    return est
