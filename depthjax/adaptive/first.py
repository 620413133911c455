"""FiRST (Jain et al. 2024): a per-sequence router picks which later steps run.

    model, spec = first.attach(model, after=2, key=key)   # router on the residual after step 2
    logits, gates = first.apply(model, spec, tokens, prompt_len=64)  # gates [B, depth]
    total, stats = first.loss(model, spec, tokens, prompt_len=64, cost=0.05)
    params, _ = fit(..., trainable="^first/")                       # the model stays frozen
    run_BS = first.choose(model, spec, prompt_BT)                   # bool [B, depth]
    first.program_for(model, run_BS[0])                              # that row's program
    out = dj.generate(model, prompt_BT, 32, policy=routed_decode.Routed(row_steps=run_BS))

The router is a small MLP on the mean over the prompt of the RMS-normalized residual after
the first `after` steps (which always run); it gives every later step a probability p of
running, and the step runs when p > 0.5. That decision is made once per sequence, from
the prompt alone, and kept while decoding: `program_for` turns a row's decision into an
ordinary program (the skipped steps dropped: `dj.generate` then caches only the steps that
run), and `dj.generate` with the `routed_decode.Routed(row_steps=...)` policy decodes a
batch whose rows run different steps (each step's cache holds only the rows that run it; a
step no row runs costs nothing).

Training (on a frozen model): the sequence's later steps are gated by a straight-through
estimate, gate = hard + p - stop_gradient(p): the forward is exactly the inference program,
the gradient reaches the router through p. The loss is the next-token loss on the tokens
after the prompt (the prompt's own predictions would see the routing its future chose) plus
`cost` times the mean p of the later steps, the price of running them. Parameters live in
params["first"].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core import walk as walk_lib
from ..core.loss import nll_sums
from ..core.model import DepthModel, output_head
from ..depth import drop
from .common import AdaptiveError, check_inputs, embed, reject_parallel, walk_views


@dataclasses.dataclass(frozen=True)
class First:
    """The router reads the residual after step `after` (steps 0..after-1 always run)."""

    after: int


def attach(model: DepthModel, after: int, key, *, hidden: int = 64, bias: float = 3.0):
    """(model with a fresh router in params["first"], First spec). The output bias starts
    at `bias` (p = sigmoid(3) = 0.95 for every step), so the router starts from the full
    model and learns which steps to give up."""
    reject_parallel(model, "FiRST")
    if not isinstance(after, (int, np.integer)) or not 1 <= after < model.depth:
        raise AdaptiveError(
            f"after={after!r}: the router reads the residual after step "
            f"`after`, which must be in 1..{model.depth - 1}"
        )
    D, S = model.config.d_model, model.depth
    k1, k2 = jax.random.split(key)
    router = {
        "w1": jax.random.normal(k1, (D, hidden)) / np.sqrt(D),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, S)) * 0.01,
        "b2": jnp.full((S,), bias),
    }
    return model.replace(params={**model.params, "first": router}), First(int(after))


def check(model: DepthModel, spec: First) -> None:
    if "first" not in model.params:
        raise AdaptiveError(
            "the model has no FiRST router (params['first']): use "
            "first.attach(model, after, key) first"
        )
    if not 1 <= spec.after < model.depth:
        raise AdaptiveError(f"after={spec.after} outside 1..{model.depth - 1}")
    reject_parallel(model, "FiRST")


def _check_prompt_len(prompt_len, T: int) -> None:
    if not isinstance(prompt_len, (int, np.integer)) or not 1 <= prompt_len < T:
        raise AdaptiveError(
            f"prompt_len must be in 1..{T - 1} (the router reads the prompt, "
            f"the loss is on the tokens after it), got {prompt_len!r}"
        )


def probabilities(router: dict, h_BTD, mask_BT, after: int):
    """p [B, depth] of running each step (1 for steps before `after`)."""
    x = h_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    w = mask_BT.astype(jnp.float32)[..., None]
    pooled_BD = jnp.sum(x * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
    p = jax.nn.sigmoid(
        jax.nn.relu(pooled_BD @ router["w1"] + router["b1"]) @ router["w2"] + router["b2"]
    )
    return jnp.where(jnp.arange(p.shape[1]) < after, 1.0, p)


def _prefix(model, spec, tokens_BT, prompt_mask_BT):
    """Run the first `after` steps; returns (h_BTD, positions, p [B, depth])."""
    x_BTD, positions_BT = embed(model, tokens_BT)
    cut = lambda a: a[: spec.after]
    h_BTD, _ = walk_views(
        model.config,
        model.params["blocks"],
        jax.tree.map(cut, model.program),
        jax.tree.map(cut, model.params.get("steps")),
        x_BTD,
        positions_BT,
    )
    return (
        h_BTD,
        positions_BT,
        probabilities(model.params["first"], h_BTD, prompt_mask_BT, spec.after),
    )


def apply(model: DepthModel, spec: First, tokens_BT, *, prompt_len: int):
    """Forward with each row's later steps gated by its router's decision (read from the
    first `prompt_len` tokens). Returns (logits [B, T, V], gates [B, depth]: hard values,
    straight-through gradients)."""
    logits, gates, _ = _checked_apply(model, spec, tokens_BT, prompt_len)
    return logits, gates


def _checked_apply(model, spec, tokens_BT, prompt_len):
    check(model, spec)
    check_inputs(model, tokens_BT)
    _check_prompt_len(prompt_len, tokens_BT.shape[1])
    return _apply(model, tokens_BT, spec=spec, prompt_len=int(prompt_len))


@functools.partial(jax.jit, static_argnames=("spec", "prompt_len"))
def _apply(model, tokens_BT, *, spec, prompt_len):
    cfg = model.config
    prompt_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]) < prompt_len, tokens_BT.shape)
    h_BTD, positions_BT, p_BS = _prefix(model, spec, tokens_BT, prompt_BT)
    gates_BS = (p_BS > 0.5).astype(jnp.float32) + p_BS - jax.lax.stop_gradient(p_BS)

    def gated(step: walk_lib.Step, carry, state, g_B):
        """Each row's step update scaled by its gate (1: runs, 0: skipped)."""
        x = step.residual(carry)
        out, _, _ = step.run((x, jnp.zeros_like(x)))
        x = x + (step.residual(out) - x) * g_B[:, None, None].astype(x.dtype)
        return (x, jnp.zeros_like(x)), state, None

    cut = lambda a: a[spec.after :]
    x_BTD, _, _ = walk_lib.walk(
        cfg,
        model.params["blocks"],
        jax.tree.map(cut, model.program),
        jax.tree.map(cut, model.params.get("steps")),
        h_BTD,
        positions_BT,
        policy=gated,
        xs=gates_BS.T[spec.after :],
    )
    return output_head(cfg, model.params, x_BTD), gates_BS, p_BS


def loss(model: DepthModel, spec: First, tokens_BT, *, prompt_len: int, cost: float):
    """Next-token loss after the prompt + cost * mean p of the later steps (module doc).
    Returns (total, stats): lm_loss, steps_run (mean later steps run per sequence)."""
    logits, gates, p = _checked_apply(model, spec, tokens_BT, prompt_len)
    cont = jnp.arange(tokens_BT.shape[1]) >= prompt_len - 1  # predictions of tokens >= prompt_len
    s, n = nll_sums(logits, tokens_BT, jnp.broadcast_to(cont, tokens_BT.shape))
    lm = s / jnp.maximum(n, 1.0)
    steps_run = jnp.mean(jnp.sum(jax.lax.stop_gradient(gates[:, spec.after :]), 1))
    return lm + cost * jnp.mean(p[:, spec.after :]), {"lm_loss": lm, "steps_run": steps_run}


def choose(model: DepthModel, spec: First, prompt_BT, mask_BT=None) -> jax.Array:
    """bool [B, depth]: which steps each prompt row's program runs."""
    check(model, spec)
    check_inputs(model, prompt_BT, mask_BT)
    mask_BT = (
        jnp.ones(jnp.shape(prompt_BT), bool) if mask_BT is None else jnp.asarray(mask_BT, bool)
    )
    return _choose(model, jnp.asarray(prompt_BT, jnp.int32), mask_BT, spec=spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _choose(model, prompt_BT, mask_BT, *, spec):
    return _prefix(model, spec, prompt_BT, mask_BT)[2] > 0.5


def program_for(model: DepthModel, run_S) -> DepthModel:
    """The model whose program keeps only the steps run_S [depth] marks (router removed)."""
    run_S = np.asarray(run_S, bool)
    if run_S.shape != (model.depth,):
        raise AdaptiveError(f"a step selection must be bool [{model.depth}], got {run_S.shape}")
    params = {k: v for k, v in model.params.items() if k != "first"}
    return drop(model.replace(params=params), np.flatnonzero(~run_S).tolist())
