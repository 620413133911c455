"""Mixture-of-Depths (Raposo et al. 2024): each routed step lets only the top `capacity`
fraction of a sequence's tokens through its block; the others skip it on the residual.

    model, spec = mod.attach(model, steps=[1, 3, 5, 7], capacity=0.125, key=key)
    logits, routes = mod.apply(model, spec, tokens)                  # training: top-k
    logits, routes = mod.apply(model, spec, tokens, routing="causal") # sampling: no look-ahead
    total, stats = mod.loss(model, spec, tokens)                      # LM loss + predictor loss

Per step i the router reads the step's input x_t and gives r_t = 1 + w_i . x_t (the paper's
r = w . x plus 1, so a fresh router, w = 0, leaves every update as it was; the ranking is
the paper's). The top k = floor(capacity * T) tokens of each row by r are *gathered*
(order kept), run through the block as a sequence of k tokens at their own positions
(they attend only to each other, causally), and scattered back as x_t + r_t * update_t:
the router weight on the update is what trains the router end to end. Compute drops with
capacity because the block really runs on k tokens (see benchmarks/mod.py); k = 0 skips
the step.

Top-k over a sequence looks ahead (whether token t is routed depends on later tokens), so
sampling uses the paper's auxiliary predictor: a small MLP per step on the step input
(with a stop-gradient, so it does not change the model) trained with binary cross-entropy
to predict top-k membership; with routing="causal" a token goes through the block when
its predictor logit exceeds `threshold`, decided from its own residual alone (and, with
`budget=n`, while fewer than n earlier tokens of its row took that step). Decoding with
these decisions and a KV cache that holds only routed tokens: depthjax.adaptive.routed_decode.

Router parameters live in params["steps"]["mod"] (leaves [depth, ...]): scanned with the
program, moved with their step by program edits. Which steps route is `MoD.routed`, data
beside the program; the capacity is static (it sets the gathered length).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import walk as walk_lib
from ..core.loss import nll_sums
from ..core.model import DepthModel, output_head
from .common import (
    AdaptiveError,
    check_inputs,
    embed,
    gather_plan,
    reject_parallel,
    scatter_add,
    take,
)

ROUTINGS = ("topk", "causal")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["routed"], meta_fields=["capacity"]
)
@dataclasses.dataclass(frozen=True)
class MoD:
    """Which steps route (bool [depth], data) and the fraction of tokens they take."""

    capacity: float
    routed: jax.Array

    @classmethod
    def create(cls, depth: int, steps, capacity: float) -> MoD:
        check_capacity(capacity)
        steps = np.asarray(list(steps), np.int64)
        bad = steps[(steps < 0) | (steps >= depth)]
        if bad.size:
            raise AdaptiveError(f"routed steps {bad.tolist()} out of range 0..{depth - 1}")
        routed = np.zeros(depth, bool)
        routed[steps] = True
        return cls(float(capacity), jnp.asarray(routed))

    def tokens_routed(self, T: int) -> int:
        """k: tokens per row a routed step takes at sequence length T (top-k routing)."""
        return int(self.capacity * T)


def check_capacity(capacity) -> None:
    if not isinstance(capacity, (int, float, np.floating)) or not 0.0 < capacity <= 1.0:
        raise AdaptiveError(
            f"capacity must be in (0, 1] (the fraction of tokens a routed "
            f"step takes), got {capacity!r}"
        )


class Routes(NamedTuple):
    """Per-step routing of one forward ([depth, B, T]; dense steps: select True, weight 1)
    and the predictor's loss and accuracy against the top-k decisions (top-k routing)."""

    select: jax.Array  # bool: the token ran the step's block
    weight: jax.Array  # float32: r = 1 + w . x, the update's multiplier
    predictor_logit: jax.Array  # float32: the causal predictor's logit
    predictor_loss: jax.Array  # float32 []: BCE against `select` (top-k routing)
    predictor_accuracy: jax.Array  # float32 []


def attach(model: DepthModel, steps, capacity: float, key, *, hidden: int = 32):
    """The model with a fresh router (w = 0) and predictor MLP on every step, and the MoD
    spec routing `steps`. Routers of unrouted steps stay unused (so steps can be switched
    to routing later without changing parameter shapes)."""
    reject_parallel(model, "Mixture-of-Depths")
    spec = MoD.create(model.depth, steps, capacity)
    S, D = model.depth, model.config.d_model
    k1, k2 = jax.random.split(key)
    mod = {
        "router": jnp.zeros((S, D)),
        "predictor": {
            "w1": jax.random.normal(k1, (S, D, hidden)) / np.sqrt(D),
            "b1": jnp.zeros((S, hidden)),
            "w2": jax.random.normal(k2, (S, hidden)) / np.sqrt(hidden),
            "b2": jnp.zeros((S,)),
        },
    }
    params = dict(model.params)
    params["steps"] = {**params.get("steps", {}), "mod": mod}
    return model.replace(params=params), spec


def router_weight(mod_step: dict, x_BTD):
    """r = 1 + w . x per token, float32 [B, T] (one step's router)."""
    return 1.0 + jnp.einsum("btd,d->bt", x_BTD.astype(jnp.float32), mod_step["router"])


def predictor_logit(mod_step: dict, x_BTD):
    """The causal predictor's logit [B, T]: an MLP on the RMS-normalized step input, with
    a stop-gradient so its training leaves the model unchanged."""
    p = mod_step["predictor"]
    x = jax.lax.stop_gradient(x_BTD).astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def check(model: DepthModel, spec: MoD) -> None:
    check_capacity(spec.capacity)
    if "mod" not in model.params.get("steps", {}):
        raise AdaptiveError(
            "the model has no routers (params['steps']['mod']): use "
            "mod.attach(model, steps, capacity, key) first"
        )
    if np.shape(spec.routed) != (model.depth,):
        raise AdaptiveError(
            f"MoD.routed has shape {np.shape(spec.routed)}; the program has {model.depth} steps"
        )
    reject_parallel(model, "Mixture-of-Depths")


def _walk(
    model: DepthModel,
    spec: MoD,
    x_BTD,
    positions_BT,
    mask_BT,
    *,
    routing,
    threshold,
    budget,
    unroll,
):
    """The program walk (depthjax.core.walk) with routed steps. Returns (x_BTD, (select,
    router weight, predictor logit) [depth, B, T])."""
    B, T, _ = x_BTD.shape
    real_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
    L = spec.tokens_routed(T) if routing == "topk" else T

    def routed(step: walk_lib.Step, x):
        sp = step.params
        r_BT = router_weight(sp["mod"], x)
        logit_BT = predictor_logit(sp["mod"], x)
        if routing == "topk":
            top_BL = jax.lax.top_k(jnp.where(real_BT, r_BT, -jnp.inf), L)[1]
            sel_BT = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], top_BL].set(True)
            sel_BT = sel_BT & real_BT
        else:
            sel_BT = (logit_BT > threshold) & real_BT
            sel_BT = sel_BT & (jnp.cumsum(sel_BT, axis=1) <= budget)
        if L == 0:
            return x, (sel_BT, r_BT, logit_BT)
        idx_BL, valid_BL = gather_plan(sel_BT, L)
        x_BLD = take(x, idx_BL)
        carry, _, _ = step.run(
            (x_BLD, jnp.zeros_like(x_BLD)),
            positions_BT=take(positions_BT, idx_BL),
            kv_mask_BT=valid_BL,
        )
        w_BL = take(r_BT, idx_BL) * valid_BL
        update_BLD = (step.residual(carry) - x_BLD) * w_BL[..., None].astype(x.dtype)
        return scatter_add(x, idx_BL, update_BLD), (sel_BT, r_BT, logit_BT)

    def dense(step: walk_lib.Step, x):
        carry, _, _ = step.run((x, jnp.zeros_like(x)))
        return step.residual(carry), (jnp.ones((B, T), bool), jnp.ones((B, T)), jnp.zeros((B, T)))

    def policy(step: walk_lib.Step, carry, state, is_routed):
        x, y = jax.lax.cond(
            is_routed, lambda x: routed(step, x), lambda x: dense(step, x), step.residual(carry)
        )
        return (x, jnp.zeros_like(x)), state, y

    x_BTD, _, ys = walk_lib.walk(
        model.config,
        model.params["blocks"],
        model.program,
        model.params["steps"],
        x_BTD,
        positions_BT,
        policy=policy,
        xs=spec.routed,
        unroll=unroll,
        kv_mask_BT=mask_BT,
    )
    return x_BTD, ys


def apply(
    model: DepthModel,
    spec: MoD,
    tokens_BT,
    *,
    mask=None,
    routing: str = "topk",
    threshold: float = 0.0,
    budget: int | None = None,
    unroll: bool = False,
):
    """Forward with routed steps. Returns (logits float32 [B, T, vocab], Routes).

    routing="topk": the training forward (each routed step takes the top k tokens by r);
    routing="causal": each token decides from its own residual (predictor logit >
    threshold; at most `budget` tokens per row per step), as when sampling. `mask` [B, T]:
    1 for real tokens (padding is never routed nor attended to).
    """
    if routing not in ROUTINGS:
        raise AdaptiveError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if budget is not None and (not isinstance(budget, (int, np.integer)) or budget < 1):
        raise AdaptiveError(f"budget must be a positive integer, got {budget!r}")
    check(model, spec)
    check_inputs(model, tokens_BT, mask)
    budget = tokens_BT.shape[1] if budget is None else budget
    return _apply(
        model,
        spec,
        tokens_BT,
        None if mask is None else jnp.asarray(mask),
        jnp.float32(threshold),
        jnp.int32(budget),
        routing=routing,
        unroll=unroll,
    )


@functools.partial(jax.jit, static_argnames=("routing", "unroll"))
def _apply(model, spec, tokens_BT, mask_BT, threshold, budget, *, routing, unroll):
    x0_BTD, positions_BT = embed(model, tokens_BT)
    x_BTD, (sel, r, logit) = _walk(
        model,
        spec,
        x0_BTD,
        positions_BT,
        mask_BT,
        routing=routing,
        threshold=threshold,
        budget=budget,
        unroll=unroll,
    )
    logits = output_head(model.config, model.params, x_BTD)
    real = jnp.ones(tokens_BT.shape, bool) if mask_BT is None else mask_BT.astype(bool)
    w = (spec.routed[:, None, None] & real[None]).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logit, sel.astype(jnp.float32))
    acc = ((logit > threshold) == sel).astype(jnp.float32)
    loss_, acc_ = (jnp.sum(bce * w) / n, jnp.sum(acc * w) / n) if routing == "topk" else (0.0, 1.0)
    return logits, Routes(sel, r, logit, jnp.asarray(loss_), jnp.asarray(acc_))


def loss(model: DepthModel, spec: MoD, tokens_BT, *, mask=None, routing: str = "topk"):
    """Training objective: mean next-token loss + the predictor's BCE (which only trains
    the predictors: their input is stop-gradiented). Returns (total, stats dict)."""
    logits, routes = apply(model, spec, tokens_BT, mask=mask, routing=routing)
    total, count = nll_sums(logits, tokens_BT, mask)
    lm = total / jnp.maximum(count, 1.0)
    return lm + routes.predictor_loss, {
        "lm_loss": lm,
        "predictor_loss": routes.predictor_loss,
        "predictor_accuracy": routes.predictor_accuracy,
    }


def step_fraction(spec: MoD, routes: Routes, mask=None) -> jax.Array:
    """Mean fraction of (step, token) pairs that ran a block: 1 for a dense model."""
    sel = routes.select
    if mask is not None:
        m = jnp.asarray(mask, bool)[None]
        return jnp.sum(sel & m) / (sel.shape[0] * jnp.sum(m))
    return jnp.mean(sel)
