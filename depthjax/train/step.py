"""The jitted pieces of training: optimizer, loss, one optimizer step, evaluation.

Parameters are float32; the forward computes in `ModelConfig.dtype` (e.g. bfloat16) with
`ModelConfig.remat`. Only leaves selected by the trainable mask get gradients and
optimizer state; the rest are passed through as constants. A step whose loss or gradient
norm is not finite is never applied: with nan_policy="stop" the state freezes from that
step on and records it in `bad_step` (the host stops the run), with "skip" the step is
counted in `skipped` and training continues.
"""

from __future__ import annotations

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import optax

from ..core.config import ModelConfig
from ..core.loss import packed_nll_sums
from ..core.model import DepthModel, apply
from ..core.program import Program
from . import layerskip as layerskip_lib
from .config import TrainConfig, TrainConfigError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken (including skipped ones)
    params: dict  # all parameters (trainable and frozen), float32
    opt_state: optax.OptState  # for the trainable leaves only
    bad_step: jax.Array  # int32 [], first non-finite step under nan_policy="stop", else -1
    skipped: jax.Array  # int32 [], non-finite steps skipped under nan_policy="skip"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params, pattern: str):
    """Bool tree: True for float leaves whose path ('blocks/attn/q/kernel') matches
    `pattern`. Integer leaves (quantized integers, a linear expansion's row positions) are
    never trained."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TrainConfigError(f"trainable={pattern!r} is not a valid regex: {e}") from None
    mask = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            bool(regex.search(path_str(p))) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        ),
        params,
    )
    if not any(jax.tree.leaves(mask)):
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise TrainConfigError(
            f"trainable={pattern!r} matches no parameter; paths look like {paths[:4]}"
        )
    return mask


def split(params, mask):
    """(trainable, frozen) trees with None where a leaf belongs to the other part."""
    return (
        jax.tree.map(lambda m, x: x if m else None, mask, params),
        jax.tree.map(lambda m, x: None if m else x, mask, params),
    )


def merge(trainable, frozen):
    return jax.tree.map(
        lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None
    )


def _decays(path, _) -> bool:
    """Weight decay on matrices, not on norms and biases (whose paths say so)."""
    s = path_str(path)
    return not ("norm" in s or s.endswith("bias"))


def learning_rate(tc: TrainConfig) -> optax.Schedule:
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, warmup, max(tc.steps, warmup + 1), end_value=tc.lr * tc.min_lr_ratio
    )


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        learning_rate(tc),
        b1=tc.b1,
        b2=tc.b2,
        eps=tc.eps,
        weight_decay=tc.weight_decay,
        mask=lambda t: jax.tree_util.tree_map_with_path(_decays, t),
    )
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm else adamw


def loss_sums(params, cfg: ModelConfig, program: Program, batch):
    """(sum of next-token cross-entropy over real target tokens, their count).

    batch: int32 [B, T] inputs, targets, segment_ids (0 = padding), positions."""
    logits_BTV = apply(
        DepthModel(cfg, params, program),
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    return packed_nll_sums(logits_BTV, batch["targets"], batch["segment_ids"])


def train_step(
    state: TrainState,
    batch,
    program: Program,
    *,
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mask,
    grad_accum: int,
    nan_policy: str,
    schedule: optax.Schedule,
    layerskip: layerskip_lib.LayerSkip | None = None,
):
    """One optimizer step over a global batch, as `grad_accum` micro-batches in a scan.

    The loss is the mean over all real target tokens of the batch, so accumulation gives
    the same gradient as one big batch. batch: int32 [B, T] each (see `loss_sums`).
    With `layerskip` (layer dropout and early-exit losses, see depthjax.train.layerskip)
    the gradient is the normalized early-exit objective's; metrics then also hold
    "objective" and "exit_loss" [n_exits]."""
    chex.assert_rank(list(batch.values()), 2)
    chex.assert_equal_shape(list(batch.values()))
    trainable, frozen = split(state.params, mask)
    if layerskip is None:

        def objective(t, mb):
            total, count = loss_sums(merge(t, frozen), cfg, program, mb)
            return total, (count, total[None])
    else:
        rows = jax.tree.leaves(batch)[0].shape[0]
        batch = {**batch, "keep": layerskip.keep_mask(state.step, rows)}
        objective = lambda t, mb: layerskip_lib.loss_sums(
            merge(t, frozen), cfg, program, mb, layerskip, state.step
        )
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (objective_sum, (count, nll)), grads = grad_fn(trainable, batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

        def body(acc, mb):
            (objective_sum, (n, nll)), g = grad_fn(trainable, mb)
            return jax.tree.map(jnp.add, acc, (objective_sum, n, nll, g)), None

        outputs = 1 + (len(layerskip.exits) if layerskip else 0)
        zeros = (
            jnp.zeros(()),
            jnp.zeros(()),
            jnp.zeros((outputs,)),
            jax.tree.map(jnp.zeros_like, trainable),
        )
        (objective_sum, count, nll, grads), _ = jax.lax.scan(body, zeros, micro)
    count = jnp.maximum(count, 1.0)
    loss, grads = objective_sum / count, jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, trainable)
    new_params = merge(optax.apply_updates(trainable, updates), frozen)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == "stop":
        ok = finite & (state.bad_step < 0)
        bad_step = jnp.where(~finite & (state.bad_step < 0), state.step, state.bad_step)
        skipped = state.skipped
    else:
        ok, bad_step, skipped = finite, state.bad_step, state.skipped + (~finite).astype(jnp.int32)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        bad_step=bad_step,
        skipped=skipped,
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": count,
        "finite": finite,
    }
    if layerskip is not None:  # "loss" stays the final output's cross-entropy
        metrics.update(loss=nll[0] / count, objective=loss, exit_loss=nll[1:] / count)
    return new_state, metrics


def eval_loss_sums(params, batch, program: Program, *, cfg: ModelConfig):
    return loss_sums(params, cfg, program, batch)
