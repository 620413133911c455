"""Generation with recurrent depth: a loop count per token, and depth-wise batching.

    out = dj.generate(model, prompt_BT, 32, policy=Looped(rec, tol=0.05, max_loops=16))
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

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import embed, output_head
from ..inference.sampling import GenerationError
from .caches import LoopView, RowView
from .recurrent import Recurrence, _Parts, adaptive_loops, check_adaptive, relative_change

SCHEDULES = ("depthwise", "lockstep")


@dataclasses.dataclass(frozen=True)
class Looped:
    """The `dj.generate(..., policy=Looped(rec, tol=, max_loops=))` policy: every token
    loops the core until its state settles (module docstring). Generation.loops [B, T + N
    - 1] holds the core loops of every fed token (prompt first), Generation.ticks the core
    iterations run after the prompt, Generation.exit_steps the steps each token took."""

    rec: Recurrence
    tol: float
    max_loops: int
    min_loops: int = 1
    schedule: str = "depthwise"

    def prepare(self, model, tokens_BT, mask_BT, max_new_tokens: int):
        check_adaptive(self.tol, self.max_loops, self.min_loops)
        self.rec.check(model)
        if self.schedule not in SCHEDULES:
            raise GenerationError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not bool(np.asarray(mask_BT).all()):
            raise GenerationError(
                "recurrent generation takes prompts of one length without padding (mask all 1)"
            )
        decoder = LoopedDecoder(
            self.rec, int(self.max_loops), int(self.min_loops), self.schedule == "lockstep"
        )
        return decoder, jnp.float32(self.tol)


def _row_sample(logits_BV, key, rows_B, index_B, sampler):
    """Row b's k-th token from fold_in(fold_in(key, b), k): independent of the batch."""
    keys = jax.vmap(lambda b, i: jax.random.fold_in(jax.random.fold_in(key, b), i))(rows_B, index_B)
    return jax.vmap(lambda logits_V, k: sampler.sample(logits_V[None], k)[0])(logits_BV, keys)


@dataclasses.dataclass(frozen=True)
class LoopedDecoder:
    """The static decoder of `Looped`; its data is the tolerance (float32 [])."""

    rec: Recurrence
    max_loops: int
    min_loops: int
    lockstep: bool

    def _parts(self, model, positions_BT):
        return _Parts(model, self.rec, positions_BT)

    def start(self, model, tol, tokens_BT, mask_BT, key, *, n, sampler):
        """The prompt through the full adaptive forward, recording every cache; the first
        token; then that token's prelude (the next loops start from it)."""
        cfg, rec = model.config, self.rec
        B, T = tokens_BT.shape
        S, J = T + n - 1, self.max_loops
        zeros = lambda *lead: jnp.zeros(lead + (B, S, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
        n_pre, n_core, n_coda = rec.start, rec.stop - rec.start, model.depth - rec.stop
        parts = self._parts(model, jnp.broadcast_to(jnp.arange(T), (B, T)))
        ones_B, count_B = jnp.ones((B,), bool), jnp.zeros((B,), jnp.int32)
        fan = lambda x, m: jnp.broadcast_to(x, (m,) + x.shape)
        pre = RowView(zeros(n_pre), zeros(n_pre), fan(count_B, n_pre), fan(ones_B, n_pre), True)
        coda = RowView(
            zeros(n_coda), zeros(n_coda), fan(count_B, n_coda), fan(ones_B, n_coda), True
        )
        core = (jnp.zeros((n_core, B, S, J, cfg.n_kv_heads, cfg.head_dim), cfg.dtype),) * 2
        s, pre = parts.run("prelude", embed(model, tokens_BT, parts.positions), views=pre)
        s, loops_BT, core = adaptive_loops(
            parts, s, tol=tol, max_loops=J, min_loops=self.min_loops, record=core
        )
        s, coda = parts.run("coda", s, views=coda)
        logits = output_head(cfg, model.params, s[:, -1:])[:, 0]
        rows = jnp.arange(B)
        first_B = _row_sample(logits, key, rows, jnp.zeros((B,), jnp.int32), sampler)
        state = dict(
            key=key,
            gen=jnp.ones((B,), jnp.int32),
            t=jnp.full((B,), T, jnp.int32),
            j=jnp.zeros((B,), jnp.int32),
            s=s[:, -1:],
            e=s[:, -1:],
            loops=jnp.full((B, S), J, jnp.int32).at[:, :T].set(loops_BT),
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
            state = self._feed(model, state, first_B, ones_B)
        return state, first_B, {}

    def _feed(self, model, state, tok_B, rows_on):
        """Embed + prelude the token tok_B of rows_on (at position t)."""
        n_pre, t = self.rec.start, state["t"]
        x = embed(model, tok_B[:, None], t[:, None])
        fan = lambda x: jnp.broadcast_to(x, (n_pre,) + x.shape)
        view = RowView(state["pre_k"], state["pre_v"], fan(t), fan(rows_on))
        x, view = self._parts(model, t[:, None]).run("prelude", x, views=view)
        on = rows_on[:, None, None]
        return dict(
            state,
            s=jnp.where(on, x, state["s"]),
            e=jnp.where(on, x, state["e"]),
            pre_k=view.k,
            pre_v=view.v,
            j=jnp.where(rows_on, 0, state["j"]),
        )

    def _finish(self, model, state, ready, *, n, sampler):
        """Rows that settled: record their loop count, coda + head, sample, feed."""
        B, n_coda = ready.shape[0], model.depth - self.rec.stop
        rows, t = jnp.arange(B), state["t"]
        loops = (
            state["loops"].at[rows, t].set(jnp.where(ready, state["j"], state["loops"][rows, t]))
        )
        fan = lambda x: jnp.broadcast_to(x, (n_coda,) + x.shape)
        view = RowView(state["coda_k"], state["coda_v"], fan(t), fan(ready))
        x, view = self._parts(model, t[:, None]).run("coda", state["s"], views=view)
        logits = output_head(model.config, model.params, x)[:, 0]
        tok_B = _row_sample(logits, state["key"], rows, state["gen"], sampler)
        gen = state["gen"] + ready
        state = dict(
            state,
            loops=loops,
            coda_k=view.k,
            coda_v=view.v,
            gen=gen,
            waiting=state["waiting"] & ~ready,
        )
        more = ready & (gen < n)
        state = dict(state, t=t + more)
        return self._feed(model, state, tok_B, more), tok_B

    def advance(self, model, tol, state, last_B, active_B, *, n, sampler):
        """One core loop for every row that is looping, whatever loop it is at; rows that
        settle emit their next token."""
        n_core, J = self.rec.stop - self.rec.start, self.max_loops
        done = ~active_B | (state["gen"] >= n)
        run = ~done & ~state["waiting"]
        fan = lambda x: jnp.broadcast_to(x, (n_core,) + x.shape)
        view = LoopView(
            state["core_k"],
            state["core_v"],
            fan(state["t"]),
            fan(state["j"]),
            fan(state["loops"]),
            fan(run),
        )
        parts = self._parts(model, state["t"][:, None])
        s_new, view = parts.loop(state["s"], state["e"], views=view)
        s_new = jnp.where(run[:, None, None], s_new, state["s"])
        j = state["j"] + run
        change = relative_change(s_new, state["s"])[:, 0]
        settled = run & (((change < tol) & (j >= self.min_loops)) | (j >= J))
        state = dict(state, s=s_new, j=j, core_k=view.k, core_v=view.v, ticks=state["ticks"] + 1)
        if self.lockstep:
            waiting = state["waiting"] | settled
            ready = jnp.where(jnp.all(waiting | done), waiting, False)
            state = dict(state, waiting=waiting)
        else:
            ready = settled
        state, tok_B = jax.lax.cond(
            jnp.any(ready),
            lambda st: self._finish(model, st, ready, n=n, sampler=sampler),
            lambda st: (st, jnp.zeros_like(last_B)),
            state,
        )
        return state, tok_B[:, None], ready.astype(jnp.int32), {}

    def finish(self, model, tol, state, generation):
        """Loop counts, ticks, and the steps each generated token took."""
        rec, loops = self.rec, state["loops"]
        B, N = generation.tokens.shape
        T = loops.shape[1] - N + 1
        fixed = rec.start + model.depth - rec.stop
        steps_BN = fixed + (rec.stop - rec.start) * loops[:, T - 1 :]
        steps_BN = jnp.where(jnp.arange(N)[None] < generation.lengths[:, None], steps_BN, 0)
        return generation._replace(
            loops=loops, ticks=state["ticks"], exit_steps=steps_BN.astype(jnp.int32)
        )
