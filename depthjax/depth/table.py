"""Transforms that rewrite the block table: materialize, compact, grow.

The config's n_layers always equals the number of table rows afterwards, and each new
row keeps the attention kind (`layer_types`: window, RoPE table) of the row it came from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..core import kinds, quant, rows as rows_lib, step_params as steps_lib
from ..core.model import DepthModel
from ..core.program import ProgramError
from .edit import select_steps

# Per-step parameters that are folded into the table rows by materialize.
FOLDED = ("delta", "lora")


def with_table(model: DepthModel, blocks, program, steps=None, *, rows) -> DepthModel:
    """The model with a new block table (and program / per-step params), n_layers updated.

    rows: int [n_new]: the old table row each new row comes from (its attention kind)."""
    params = {k: v for k, v in model.params.items() if k != "steps"}
    params["blocks"] = blocks
    if steps:
        params["steps"] = steps
    n = rows_lib.count(blocks)
    if len(np.asarray(rows).reshape(-1)) != n:
        raise ValueError(
            f"with_table: {len(np.asarray(rows).reshape(-1))} source rows for {n} table rows"
        )
    config = model.config.replace(n_layers=n, layer_types=kinds.take(model.config, rows))
    return model.replace(config=config, params=params, program=program)


def step_rows(model: DepthModel):
    """The block parameters each step runs, per-step deltas and LoRA folded in:
    leaves [depth, ...]."""
    blocks, steps = model.params["blocks"], model.params.get("steps") or {}
    rows = rows_lib.take(blocks, model.program.block)  # floats, whatever the storage
    folded = {k: v for k, v in steps.items() if k in FOLDED}
    if not folded:
        return rows
    return jax.vmap(steps_lib.effective_row)(rows, folded)


def materialize(model: DepthModel) -> DepthModel:
    """One private table row per step (untie), with per-step deltas and LoRA folded in.
    The model's function is unchanged."""
    rest = {k: v for k, v in (model.params.get("steps") or {}).items() if k not in FOLDED}
    program = model.program.replace(block=jnp.arange(model.depth, dtype=jnp.int32))
    return with_table(model, step_rows(model), program, rest, rows=model.program.block)


def compact(model: DepthModel) -> DepthModel:
    """Drop steps whose attention and MLP gates are both 0 (and that carry no recovery
    adapter), then table rows no step uses. The model's function is unchanged."""
    prog = model.program
    off = np.asarray((prog.attn == 0) & (prog.mlp == 0))
    adapter = (model.params.get("steps") or {}).get("adapter")
    if adapter is not None:  # a gated-off step may still carry a recovery adapter
        off &= ~np.any(
            [
                np.any(np.asarray(a).reshape(model.depth, -1) != 0, axis=1)
                for a in jax.tree.leaves(adapter)
            ],
            axis=0,
        )
    if off.all():
        raise ProgramError("every step is gated off; compacting would leave no steps")
    if off.any():
        model = select_steps(model, np.flatnonzero(~off))
    used, block = np.unique(np.asarray(model.program.block), return_inverse=True)
    if len(used) == model.n_blocks:
        return model
    blocks = rows_lib.select(model.params["blocks"], used)  # keeps the storage
    program = model.program.replace(block=jnp.asarray(block, jnp.int32))
    return with_table(model, blocks, program, model.params.get("steps"), rows=used)


def _zero_output(cfg, row: dict) -> dict:
    """Zero what makes a block's update nonzero, so a new step is the identity."""
    flat = traverse_util.flatten_dict(row)
    zero = [("attn", "o"), ("mlp", "down")]
    if cfg.norm_placement == "peri":
        zero += [("attn_out_norm",), ("mlp_out_norm",)]
    for path in flat:
        if any(path[: len(z)] == z for z in zero):
            flat[path] = jnp.zeros_like(flat[path])
    return traverse_util.unflatten_dict(flat)


def grow(model: DepthModel, after: int, init: str = "identity") -> DepthModel:
    """Insert a new step after step `after` (-1: at the front), running a new table row.

    init="copy": the row is a copy of the one step `after` runs (step 0's for -1);
    init="identity": that copy with its output projections zeroed, so the model's function
    is unchanged (LLaMA-Pro / depth up-scaling). Post-norm blocks cannot be an identity.
    """
    quant.require_float(model.params["blocks"], "grow")
    if init not in ("identity", "copy"):
        raise ValueError(f"init must be 'identity' or 'copy', got {init!r}")
    if init == "identity" and model.config.norm_placement == "post":
        raise ProgramError(
            "a post-norm block normalizes the residual stream, so no weights "
            "make it an identity; use init='copy' or a pre/peri-norm model"
        )
    if not isinstance(after, (int, np.integer)) or not -1 <= after < model.depth:
        raise ProgramError(f"after={after!r} out of range -1..{model.depth - 1}")
    src = max(after, 0)
    if after + 1 < model.depth and bool(model.program.parallel[after + 1]):
        raise ProgramError(
            f"cannot insert after step {after}: step {after + 1} is in a parallel group with it"
        )
    # The new row holds what step `src` really runs (its per-step deltas folded in); the
    # new step's own per-step parameters start at zero.
    row = jax.tree.map(lambda t: t[model.program.block[src]], model.params["blocks"])
    steps = model.params.get("steps") or {}
    row = steps_lib.effective_row(
        row, {k: jax.tree.map(lambda a: a[src], v) for k, v in steps.items() if k in FOLDED}
    )
    if init == "identity":
        row = _zero_output(model.config, row)
    new_id = model.n_blocks
    blocks = jax.tree.map(lambda t, r: jnp.concatenate([t, r[None]]), model.params["blocks"], row)
    prog = model.program
    pos = after + 1
    insert = lambda a, v: jnp.concatenate([a[:pos], jnp.asarray([v], a.dtype), a[pos:]])
    program = prog.replace(
        block=insert(prog.block, new_id),
        attn=insert(prog.attn, 1.0),
        mlp=insert(prog.mlp, 1.0),
        parallel=insert(prog.parallel, False),
    )
    if steps:

        def fresh(name, tree):  # the new step's per-step parameters: scale 1, deltas 0
            fill = jnp.ones_like if name == "scale" else jnp.zeros_like
            return jax.tree.map(lambda a: fill(a[:1]), tree)

        new = {k: fresh(k, v) for k, v in steps.items()}
        steps = jax.tree.map(lambda a, n: jnp.concatenate([a[:pos], n, a[pos:]]), steps, new)
    source = np.append(np.arange(model.n_blocks), int(model.program.block[src]))
    return with_table(model, blocks, program, steps, rows=source)
