"""Pieces the adaptive-depth mechanisms share: their error class, the embedding and
input checks of a forward, the per-step loss sums, and routed-token gathering."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..core import walk as walk_lib
from ..core.model import DepthModel, check_inputs as check_model_inputs, embed as embed_tokens
from ..core.program import ProgramError, is_concrete
from ..errors import DepthjaxError


class AdaptiveError(DepthjaxError):
    """An adaptive-depth setting (capacity, loop count, span, router) that cannot work."""


def check_inputs(model: DepthModel, tokens_BT, mask_BT=None) -> None:
    """The checks `dj.apply` makes on its inputs (on the host, before compute)."""
    check_model_inputs(model, tokens_BT, mask_BT, None, None)


def embed(model: DepthModel, tokens_BT):
    """tokens -> (x0_BTD, positions_BT) as `dj.apply` starts its forward."""
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    x_BTD = embed_tokens(model, tokens_BT, positions_BT)
    return x_BTD, positions_BT


def reject_parallel(model: DepthModel, what: str) -> None:
    """The adaptive walks carry a single residual: parallel groups are not supported."""
    if not is_concrete(model.program):
        return
    par = np.asarray(model.program.parallel)
    if par.any():
        raise ProgramError(
            f"{what} needs a program without parallel groups; steps "
            f"{np.flatnonzero(par).tolist()} share their input"
        )


def gather_plan(select_BT, L: int):
    """Indices of the selected tokens, in order, in a buffer of L slots.

    Returns (idx_BL int32, valid_BL bool): slot l of row b holds token idx[b, l]; slots past
    the row's selected count are `valid=False` and hold unselected tokens (distinct ones,
    so a scatter back never collides). Keeping the order keeps causal attention over
    slots equal to causal attention over positions among the selected tokens.
    """
    order_BT = jnp.argsort(~select_BT, axis=1, stable=True).astype(jnp.int32)
    idx_BL = order_BT[:, :L]
    valid_BL = jnp.arange(L)[None, :] < jnp.sum(select_BT, axis=1, keepdims=True)
    return idx_BL, valid_BL


def take(x_BT, idx_BL):
    """x [B, T, ...] gathered at idx [B, L] along time -> [B, L, ...]."""
    idx = idx_BL.reshape(idx_BL.shape + (1,) * (x_BT.ndim - 2))
    return jnp.take_along_axis(x_BT, idx, axis=1)


def scatter_add(x_BTD, idx_BL, update_BLD):
    """x with update added at the gathered positions (indices within a row are distinct)."""
    rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
    return x_BTD.at[rows_B1, idx_BL].add(update_BLD.astype(x_BTD.dtype))


def with_views(step: walk_lib.Step, carry, state, view):
    """Walk policy: each step attends through its own cache view (xs: views stacked on a
    leading [depth] axis, objects with the `update` protocol of depthjax.adaptive.caches);
    with a cache the attention runs (and writes) whatever its gate. ys: the updated views."""
    if view is None:
        return step.run(carry)[0], state, None
    out = step.run(carry, kv_cache=view, attn=True)
    return out[0], state, out[3]


def walk_views(
    cfg, blocks, program, step_params, x_BTD, positions_BT, *, views=None, kv_mask_BT=None
):
    """Run `program` (any depth, even 0) on x, one scan (depthjax.core.walk).

    views: optional per-step caches stacked on a leading [depth] axis (`with_views`);
    returns (x_out_BTD, updated views)."""
    x_BTD, _, views = walk_lib.walk(
        cfg,
        blocks,
        program,
        step_params,
        x_BTD,
        positions_BT,
        policy=with_views,
        xs=views,
        kv_mask_BT=kv_mask_BT,
    )
    return x_BTD, views
