"""Generation with recurrent depth: a loop count per token, and depth-wise batching.

    out = generate(model, rec, prompt_BT, 32, tol=0.05, max_loops=16)
    out.tokens [B, N]; out.loops [B, T + N - 1] (loops each fed token ran); out.ticks

Each row of the batch runs its current token through the core until the state settles
(`recurrent.apply_adaptive`'s rule), then the coda and head sample its next token, whose
prelude output starts the next loops. With schedule="depthwise" (the default) every tick
runs one core loop for all rows at once, whatever loop each row is at: the core's
parameters are shared by every loop, so tokens at loop 1 and loop 7 are one batch, and a
row that settles moves on to its next token while the others keep looping. The lockstep
alternative (schedule="lockstep") makes settled rows wait until the whole batch has
settled, as a decoder without depth-wise batching must; the number of core ticks each needs
is `ticks` (experiments/10_recurrent_depth.py compares them).

The core's KV cache has one entry per token per loop it ran (depthjax.adaptive.caches.
LoopView, [B, S, max_loops, K, Dh] per core step): a token at loop j attends to each
earlier token's keys from loop min(j, its loop count), the same keys the full forward
shows, so generation equals `apply_adaptive` on the generated sequence and does not depend
on the batch (tested). Sampling draws row b's k-th token with fold_in(fold_in(key, b), k).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..core.model import Embed, output_head
from ..inference.sampling import GenerationError, sample
from .caches import LoopView, RowView
from .recurrent import Recurrence, _Parts, adaptive_loops, check_adaptive, relative_change

SCHEDULES = ("depthwise", "lockstep")


class RecurrentGeneration(NamedTuple):
    tokens: jax.Array  # int32 [B, N]
    loops: jax.Array  # int32 [B, T + N - 1]: core loops of every fed token (prompt first)
    ticks: jax.Array  # int32 []: core iterations run for the batch after the prompt


def generate(
    model,
    rec: Recurrence,
    prompt_BT,
    max_new_tokens: int,
    *,
    tol: float,
    max_loops: int,
    min_loops: int = 1,
    schedule: str = "depthwise",
    temperature: float = 0.0,
    top_k=None,
    top_p=None,
    key=None,
) -> RecurrentGeneration:
    """Sample `max_new_tokens` after each prompt row (all rows the same length, no padding)."""
    check_adaptive(tol, max_loops, min_loops)
    rec.check(model)
    if schedule not in SCHEDULES:
        raise GenerationError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature != 0 and key is None:
        raise GenerationError("sampling (temperature > 0) needs a PRNG key")
    if not model.config.causal:
        raise GenerationError("generation needs a causal model")
    prompt_BT = jnp.asarray(prompt_BT)
    if prompt_BT.ndim != 2 or not jnp.issubdtype(prompt_BT.dtype, jnp.integer):
        raise GenerationError(
            f"prompt tokens must be int [batch, time], got {prompt_BT.dtype} {prompt_BT.shape}"
        )
    if (
        model.config.position == "learned"
        and prompt_BT.shape[1] + max_new_tokens > model.config.max_seq_len
    ):
        raise GenerationError("prompt + new tokens exceed max_seq_len")
    sampler = (
        ("temperature", float(temperature)),
        ("top_k", top_k),
        ("top_p", None if top_p is None else float(top_p)),
    )
    return _generate(
        model,
        prompt_BT.astype(jnp.int32),
        jax.random.key(0) if key is None else key,
        jnp.float32(tol),
        rec=rec,
        n=int(max_new_tokens),
        max_loops=int(max_loops),
        min_loops=int(min_loops),
        lockstep=schedule == "lockstep",
        sampler=sampler,
    )


def _row_sample(logits_BV, key, rows_B, index_B, sampler):
    keys = jax.vmap(lambda b, i: jax.random.fold_in(jax.random.fold_in(key, b), i))(rows_B, index_B)
    return jax.vmap(lambda logits_V, k: sample(logits_V[None], k, **dict(sampler))[0])(
        logits_BV, keys
    )


@functools.partial(
    jax.jit, static_argnames=("rec", "n", "max_loops", "min_loops", "lockstep", "sampler")
)
def _generate(model, prompt_BT, key, tol, *, rec, n, max_loops, min_loops, lockstep, sampler):
    cfg = model.config
    B, T = prompt_BT.shape
    S, J = T + n - 1, max_loops
    zeros = lambda *lead: jnp.zeros(lead + (B, S, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
    n_pre, n_core, n_coda = rec.start, rec.stop - rec.start, model.depth - rec.stop
    rows = jnp.arange(B)
    fan = lambda x, m: jnp.broadcast_to(x, (m,) + x.shape)
    embed = lambda tok_BT, pos_BT: Embed(cfg).apply(
        {"params": model.params["embed"]}, tok_BT, pos_BT
    )

    # -- prompt: the full adaptive forward, recording every cache --
    parts = _Parts(model, rec, jnp.broadcast_to(jnp.arange(T), (B, T)))
    ones_B, count_B = jnp.ones((B,), bool), jnp.zeros((B,), jnp.int32)
    pre = RowView(zeros(n_pre), zeros(n_pre), fan(count_B, n_pre), fan(ones_B, n_pre), True)
    coda = RowView(zeros(n_coda), zeros(n_coda), fan(count_B, n_coda), fan(ones_B, n_coda), True)
    core = (jnp.zeros((n_core, B, S, J, cfg.n_kv_heads, cfg.head_dim), cfg.dtype),) * 2
    s, pre = parts.run("prelude", embed(prompt_BT, parts.positions), views=pre)
    s, loops_BT, core = adaptive_loops(
        parts, s, tol=tol, max_loops=J, min_loops=min_loops, record=core
    )
    s, coda = parts.run("coda", s, views=coda)
    logits = output_head(cfg, model.params, s[:, -1:])[:, 0]
    tokens = (
        jnp.zeros((B, n), jnp.int32)
        .at[:, 0]
        .set(_row_sample(logits, key, rows, jnp.zeros((B,), jnp.int32), sampler))
    )
    loops_BS = jnp.full((B, S), J, jnp.int32).at[:, :T].set(loops_BT)

    def feed(state, rows_on):
        """Embed + prelude the last sampled token of rows_on (at position t)."""
        t = state["t"]
        tok = jnp.take_along_axis(state["tokens"], state["gen"][:, None] - 1, axis=1)
        x = embed(tok, t[:, None])
        view = RowView(state["pre_k"], state["pre_v"], fan(t, n_pre), fan(rows_on, n_pre))
        x, view = parts.at(t[:, None]).run("prelude", x, views=view)
        on = rows_on[:, None, None]
        return dict(
            state,
            s=jnp.where(on, x, state["s"]),
            e=jnp.where(on, x, state["e"]),
            pre_k=view.k,
            pre_v=view.v,
            j=jnp.where(rows_on, 0, state["j"]),
        )

    state = dict(
        tokens=tokens,
        gen=jnp.ones((B,), jnp.int32),
        t=jnp.full((B,), T, jnp.int32),
        j=jnp.zeros((B,), jnp.int32),
        s=s[:, -1:],
        e=s[:, -1:],
        loops=loops_BS,
        pre_k=pre.k,
        pre_v=pre.v,
        coda_k=coda.k,
        coda_v=coda.v,
        core_k=core[0],
        core_v=core[1],
        waiting=jnp.zeros((B,), bool),
        ticks=jnp.zeros((), jnp.int32),
    )
    if n > 1:
        state = feed(state, ones_B)

    def finish(state, ready):
        """Rows that settled: record their loop count, coda + head, sample, feed."""
        t = state["t"]
        loops = (
            state["loops"].at[rows, t].set(jnp.where(ready, state["j"], state["loops"][rows, t]))
        )
        view = RowView(state["coda_k"], state["coda_v"], fan(t, n_coda), fan(ready, n_coda))
        x, view = parts.at(t[:, None]).run("coda", state["s"], views=view)
        tok = _row_sample(output_head(cfg, model.params, x)[:, 0], key, rows, state["gen"], sampler)
        gen = state["gen"]
        tokens = (
            state["tokens"]
            .at[rows, gen]
            .set(jnp.where(ready, tok, state["tokens"][rows, jnp.minimum(gen, n - 1)]), mode="drop")
        )
        gen = gen + ready
        state = dict(
            state,
            loops=loops,
            coda_k=view.k,
            coda_v=view.v,
            tokens=tokens,
            gen=gen,
            waiting=state["waiting"] & ~ready,
        )
        more = ready & (gen < n)
        state = dict(state, t=t + more)
        return feed(state, more)

    def tick(state):
        done = state["gen"] >= n
        run = ~done & ~state["waiting"]
        view = LoopView(
            state["core_k"],
            state["core_v"],
            fan(state["t"], n_core),
            fan(state["j"], n_core),
            fan(state["loops"], n_core),
            fan(run, n_core),
        )
        s_new, view = parts.at(state["t"][:, None]).loop(state["s"], state["e"], views=view)
        s_new = jnp.where(run[:, None, None], s_new, state["s"])
        j = state["j"] + run
        settled = run & (
            ((relative_change(s_new, state["s"])[:, 0] < tol) & (j >= min_loops)) | (j >= J)
        )
        state = dict(state, s=s_new, j=j, core_k=view.k, core_v=view.v, ticks=state["ticks"] + 1)
        if lockstep:
            waiting = state["waiting"] | settled
            ready = jnp.where(jnp.all(waiting | done), waiting, False)
            state = dict(state, waiting=waiting)
        else:
            ready = settled
        return jax.lax.cond(jnp.any(ready), finish, lambda st, _: st, state, ready)

    state = jax.lax.while_loop(lambda st: jnp.any(st["gen"] < n), tick, state)
    return RecurrentGeneration(state["tokens"], state["loops"], state["ticks"])
