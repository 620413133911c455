"""The one program walker: every path that runs a program step by step goes through `walk`.

    x_BTD, state, ys = walk(cfg, blocks, program, step_params, x_BTD, positions_BT,
                            policy=policy, state=state, xs=xs)

`walk` scans the program's steps (one `lax.scan`, or a Python loop with unroll=True that
runs the same step function). It owns what every path shares: the residual carry
(base, acc) with its parallel-group bookkeeping (`program_step`), the per-step parameters
scanned with the program, and rematerialization. What differs between paths is a *policy*,
a function called once per step:

    policy(step: Step, carry, state, xs_i) -> (carry, state, y_i)

`step.run(carry, **options)` runs the step (`program_step` with this step's program entry,
per-step parameters and positions); the policy decides how: on which tokens (Mixture-of-
Depths gathers the routed ones), with which cache view (a KV cache slot, a per-row or
per-loop view), whether rows that exited keep their residual (early exit), or whether the
step runs at all (`lax.cond`). `state` is the policy's own carry (a cache, exit flags) and
`xs` its per-step inputs (slots, routing flags, gates), scanned with the program. The
policies live beside what they serve: `forward` here (dj.apply, traces, suffixes),
decoding's in depthjax.inference.cached, routing's in depthjax.adaptive.

`sublayer_updates` is the step code itself (the gated, scaled updates of one table row on
its input): `program_step` calls it, and so do `dj.specialize`'s static runs and groups.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import kinds as kinds_lib, rows as rows_lib, step_params as steps_lib
from .block import step_updates
from .config import ModelConfig, Remat
from .program import Program

_REMAT_POLICIES = {
    Remat.FULL: None,
    Remat.DOTS: jax.checkpoint_policies.checkpoint_dots,
    Remat.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematerialized(cfg: ModelConfig, fn, *, prevent_cse: bool = True):
    """`fn` under the config's remat policy (`jax.checkpoint`); fn itself for Remat.NONE."""
    if cfg.remat is Remat.NONE:
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=prevent_cse)


def sublayer_updates(
    cfg: ModelConfig,
    row,
    x_BTD,
    attn_gate,
    mlp_gate,
    step_params,
    positions_BT,
    *,
    attn: bool | None = None,
    mlp: bool | None = None,
    kv_cache=None,
    row_fn: Callable | None = None,
    **attn_kwargs,
):
    """One step's updates on its input x [B, T, D]: (u_attn, u_mlp) [B, T, D], gated and
    scaled by the step's parameters (+ the updated `kv_cache` when one is given).

    `row` is the table row; the step's parameters (LoRA, deltas) change it first, then
    `row_fn` (dj.specialize folds norm gains into kernels). attn / mlp: see
    `block.step_updates` (None: run when the gate is not 0; True / False: static)."""
    row = steps_lib.effective_row(row, step_params)
    if row_fn is not None:
        row = row_fn(row)
    out = step_updates(
        cfg,
        row,
        x_BTD,
        attn_gate,
        mlp_gate,
        positions_BT,
        attn=attn,
        mlp=mlp,
        kv_cache=kv_cache,
        **attn_kwargs,
    )
    s = steps_lib.scale(step_params)
    return tuple(u * jnp.asarray(s, u.dtype) for u in out[:2]) + tuple(out[2:])


def program_step(
    cfg: ModelConfig,
    blocks,
    carry,
    step_prog: Program,
    step_params,
    positions_BT,
    *,
    kv_cache=None,
    attn: bool | None = None,
    **attn_kwargs,
):
    """One step of the program on the residual carry (base, acc).

    `base` is the input shared by the current parallel group and `acc` the sum of its
    updates so far, so the residual stream is base + acc; a step with parallel=False first
    commits the previous group (base += acc). A sublayer whose gate is 0 is not computed
    (`attn`: see `block.step_updates`). Returns (carry, u_attn_BTD, u_mlp_BTD), and the
    updated `kv_cache` when one is given.
    """
    base, acc = carry
    base = jnp.where(step_prog.parallel, base, base + acc)
    acc = jnp.where(step_prog.parallel, acc, jnp.zeros_like(acc))
    if step_params and "adapter" in step_params:
        update = steps_lib.adapter_update(step_params["adapter"], base)
        base = base + jnp.where(step_prog.parallel, jnp.zeros_like(update), update)
    row = rows_lib.take(blocks, step_prog.block)  # stored rows are made floats here
    attn_kwargs.update(kinds_lib.row_kind(cfg, step_prog.block))  # gathered like the row
    out = sublayer_updates(
        cfg,
        row,
        base,
        step_prog.attn,
        step_prog.mlp,
        step_params,
        positions_BT,
        attn=attn,
        kv_cache=kv_cache,
        **attn_kwargs,
    )
    u_attn, u_mlp = out[:2]
    acc = acc + u_attn + u_mlp
    return ((base, acc), u_attn, u_mlp) + tuple(out[2:])


@dataclasses.dataclass(frozen=True)
class Step:
    """One program step as a policy sees it: `run` it on a carry, with options."""

    cfg: ModelConfig
    blocks: dict
    program: Program  # this step's entry (block, attn, mlp, parallel: scalars)
    params: dict | None  # this step's per-step parameters
    positions_BT: jax.Array
    attn_kwargs: dict

    def run(self, carry, *, positions_BT=None, **options):
        """`program_step` on `carry`; options (kv_cache, attn, kv_mask_BT, ...) override
        the walk's attention arguments; positions_BT those of gathered tokens."""
        positions_BT = self.positions_BT if positions_BT is None else positions_BT
        return program_step(
            self.cfg,
            self.blocks,
            carry,
            self.program,
            self.params,
            positions_BT,
            **{**self.attn_kwargs, **options},
        )

    def residual(self, carry):
        """The residual stream base + acc of a carry."""
        return carry[0] + carry[1]


def plain(step: Step, carry, state, xs):
    """The default policy: run every step on every token."""
    return step.run(carry)[0], state, None


def walk(
    cfg: ModelConfig,
    blocks,
    program: Program,
    step_params,
    x_BTD,
    positions_BT,
    *,
    policy=plain,
    state=None,
    xs=None,
    unroll: bool = False,
    remat: bool = False,
    **attn_kwargs,
):
    """Walk `program` (any depth, even 0) over the block table from residual x [B, T, D].

    step_params (leaves [depth, ...]) and xs (the policy's per-step inputs, leaves
    [depth, ...]) are scanned with the program; attn_kwargs (segment_ids_BT, kv_mask_BT)
    reach every step. Returns (residual_BTD after the last step, state, ys stacked over
    steps). remat=True runs each step under the config's remat policy (training).
    """

    def body(carry_state, inputs):
        carry, state = carry_state
        step_prog, sp, x_i = inputs
        step = Step(cfg, blocks, step_prog, sp, positions_BT, attn_kwargs)
        carry, state, y = policy(step, carry, state, x_i)
        return (carry, state), y

    if remat:  # CSE is only a risk for the forward outside a scan
        body = rematerialized(cfg, body, prevent_cse=unroll)
    init = ((x_BTD, jnp.zeros_like(x_BTD)), state)
    inputs = (program, step_params, xs)
    if unroll:
        carry_state, ys = init, []
        for i in range(program.depth):
            carry_state, y = body(carry_state, jax.tree.map(operator.itemgetter(i), inputs))
            ys.append(y)
        ys = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None
    else:
        carry_state, ys = jax.lax.scan(body, init, inputs)
    (base, acc), state = carry_state
    return base + acc, state, ys


def forward(*, trace: bool = False, start=None):
    """The policy of `dj.apply`: every step on every token; with trace=True each step
    yields (residual after it, u_attn, u_mlp). start (int32 [], may be traced): steps before
    it are skipped at run time (the walk starts from residual[start]: a suffix of the
    program in the same compiled function for every start). xs: the step indices."""

    def policy(step: Step, carry, state, i):
        run = lambda: step.run(carry)
        if start is None:
            new, u_attn, u_mlp = run()
        else:
            zeros = jnp.zeros_like(carry[0])
            new, u_attn, u_mlp = jax.lax.cond(i < start, lambda: (carry, zeros, zeros), run)
        return new, state, ((step.residual(new), u_attn, u_mlp) if trace else None)

    return policy


def run_blocks(
    cfg: ModelConfig,
    blocks,
    program: Program,
    x_BTD,
    positions_BT,
    *,
    step_params=None,
    segment_ids_BT=None,
    kv_mask_BT=None,
    trace: bool = False,
    unroll: bool = False,
    start=None,
):
    """The forward walk of `dj.apply`. Returns (x_out_BTD, per-step (residual, u_attn,
    u_mlp) when trace=True, else None); `start`: see `forward`."""
    x_BTD, _, ys = walk(
        cfg,
        blocks,
        program,
        step_params,
        x_BTD,
        positions_BT,
        policy=forward(trace=trace, start=start),
        xs=jnp.arange(program.depth),
        unroll=unroll,
        remat=True,
        segment_ids_BT=segment_ids_BT,
        kv_mask_BT=kv_mask_BT,
    )
    return x_BTD, ys
