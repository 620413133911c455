"""Self-speculative decoding: draft with a cheaper program over the same block table,
verify with the full program in one pass (LayerSkip, Elhoushi et al. 2024).

    out = dj.generate(model, prompt_BT, 64, draft=k, draft_tokens=4, temperature=0.0)
    out.draft.acceptance                  # accepted / proposed draft tokens

`draft` is k (the first k steps and the shared head, as `exit_at=k`), a `Program` over the
model's table, or a `DepthModel` from `depthjax.depth` (e.g. `drop_sublayers(model, attn=...)`).
The draft and the full program share their longest common prefix of m steps (m = k for
draft=k). Each round, from the last emitted token x_0:

1. draft: feed x_0, d_1, ..., d_n one at a time through the draft program, which proposes
   d_1..d_n. Its first m steps are the full program's: they write the full program's KV
   cache, and their output residual[m] of every fed token is kept. Steps past m have their
   own cache (`draft cache`), filled the same way for every token;
2. verify: run the full program's steps m..depth-1 on those n + 1 residuals in one pass
   (n + 1 queries per row over the cache): the full model's next-token distribution after
   each of x_0, d_1, ..., d_n. Nothing the draft computed is recomputed;
3. accept: greedy (temperature 0) keeps the longest prefix of drafts that equal the full
   model's argmax, then appends the full model's own next token, so the output equals
   plain greedy decoding token for token. Sampled: d_j is accepted with probability
   min(1, p(d_j) / q(d_j)) (p, q: the full and the draft sampling distributions after
   temperature / top-k / top-p); at the first rejection the next token is drawn from
   max(0, p - q) normalized, after n acceptances from p (Leviathan et al. 2023; Chen et
   al. 2023): every emitted token is distributed exactly as the full model's.

A row that accepts a drafts emits a + 1 tokens; rows advance by different numbers of
tokens (the cache keeps a write index per row), and the rejected drafts' cache entries are
overwritten by the next round.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core import program as program_lib
from ..core.model import DepthModel, embed, output_head
from ..core.program import Program, ProgramError
from ..depth.edit import select_steps
from .cached import Exit, last_real, prompt_positions, walk_cached
from .kv_cache import KVCache, attention_steps
from .sampling import GenerationError, Sampler


class DraftStats(NamedTuple):
    """Per-row counts of a self-speculative generation."""

    accepted: jax.Array  # int32 [B]: draft tokens accepted (the full model agreed)
    drafted: jax.Array  # int32 [B]: draft tokens proposed (draft_tokens per round)
    rounds: jax.Array  # int32 [B]: verification passes of the full program

    @property
    def acceptance(self) -> float:
        """Accepted / proposed draft tokens over the batch."""
        return float(np.sum(self.accepted) / max(int(np.sum(self.drafted)), 1))


@dataclasses.dataclass(frozen=True)
class Draft:
    """The self-speculative policy of `dj.generate(..., draft=, draft_tokens=)`."""

    draft: object  # a depth k, a Program or a DepthModel over the model's table
    tokens: int = 4  # draft tokens per round

    def prepare(self, model: DepthModel, tokens_BT, mask_BT, max_new_tokens):
        """(the static Plan, the draft model): checked on the host."""
        draft, shared = draft_model(model, self.draft)
        return plan(model, draft, shared, self.tokens), draft


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of one compiled speculative loop; the decoder `dj.generate` drives
    (depthjax.inference.driver); its data is the draft model."""

    depth: int  # steps of the full program
    shared: int  # m: leading steps the draft shares with it
    draft_depth: int
    n: int  # draft tokens per round
    cache_steps: tuple[int, ...]  # the full program's attention steps (its cache slots)
    tail_steps: tuple[int, ...]  # the draft's attention steps in [shared, draft_depth)

    def span(self, start: int, stop: int, steps: tuple[int, ...]) -> Exit:
        """The cached walk of steps start..stop-1 with cache slots for `steps`."""
        return Exit(stop, steps, start=start)

    # ---------------------------------------------------- the decoder (traced)
    def start(self, model: DepthModel, draft: DepthModel, tokens_BT, mask_BT, key, *, n, sampler):
        """Prefill the full program over the prompt and the draft's own steps past m; the
        first token is sampled from the full model."""
        cfg, (B, T) = model.config, tokens_BT.shape
        m, L = self.shared, self.depth
        max_len = T + n + self.n  # each round writes n + 1 entries past a row's emitted tokens
        positions_BT = prompt_positions(mask_BT)
        cache = KVCache.empty(cfg, self.cache_steps, L, B, max_len)
        tail = KVCache.empty(cfg, self.tail_steps, self.draft_depth, B, max_len)
        x_BTD = embed(model, tokens_BT, positions_BT)
        if m:
            x_BTD, cache, _ = walk_cached(
                model,
                x_BTD,
                positions_BT,
                mask_BT,
                cache,
                self.span(0, m, self.cache_steps),
                prefill=True,
            )
        if self.draft_depth > m:
            _, tail, _ = walk_cached(
                draft,
                x_BTD,
                positions_BT,
                mask_BT,
                tail,
                self.span(m, self.draft_depth, self.tail_steps),
                prefill=True,
            )
        x_BTD, cache, _ = walk_cached(
            model,
            x_BTD,
            positions_BT,
            mask_BT,
            cache,
            self.span(m, L, self.cache_steps),
            prefill=True,
        )
        logits_BV = output_head(cfg, model.params, last_real(x_BTD, mask_BT))[:, 0]
        length_B, pos_B = jnp.full((B,), T, jnp.int32), mask_BT.sum(1).astype(jnp.int32)
        cache, tail = _at(cache, length_B, pos_B), _at(tail, length_B, pos_B)
        key, sub = jax.random.split(key)
        first_B = sampler.sample(logits_BV, sub)
        zeros_B = jnp.zeros((B,), jnp.int32)
        state = (cache, tail, key, DraftStats(zeros_B, zeros_B, zeros_B))
        return state, first_B, {"exit_steps": jnp.full((B,), L, jnp.int32)}

    def advance(self, model, draft, state, last_B, active_B, *, n, sampler: Sampler):
        """One round from x_0 = each row's last emitted token: draft, verify, accept;
        emits a + 1 tokens per row (module docstring)."""
        cfg, B, nd = model.config, last_B.shape[0], self.n
        m, L = self.shared, self.depth
        shared_ex, rest_ex = self.span(0, m, self.cache_steps), self.span(m, L, self.cache_steps)
        tail_ex = self.span(m, self.draft_depth, self.tail_steps)
        cache, tail, key, stats = state
        key, k_draft, k_accept = jax.random.split(key, 3)

        def draft_step(carry, i):
            """Feed token i of the round (x_0, then d_i) through the draft; propose d_{i+1}."""
            cache, tail, tok_B = carry
            length, pos = cache.length + i, cache.next_pos + i  # base + i (reset after the scan)
            pos_B1 = pos[:, None]
            r_B1D = embed(model, tok_B[:, None], pos_B1)
            if m:
                r_B1D, c, _ = walk_cached(
                    model, r_B1D, pos_B1, None, _at(cache, length, pos), shared_ex, prefill=False
                )
                cache = _at(c, cache.length, cache.next_pos)
            h_B1D = r_B1D
            if self.draft_depth > m:
                h_B1D, c, _ = walk_cached(
                    draft, r_B1D, pos_B1, None, _at(tail, length, pos), tail_ex, prefill=False
                )
                tail = _at(c, tail.length, tail.next_pos)

            def propose():  # the last fed token's proposal would not be verified: skip its head
                q_BV = output_head(cfg, draft.params, h_B1D)[:, 0]
                return q_BV, sampler.sample(q_BV, jax.random.fold_in(k_draft, i))

            q_BV, d_B = jax.lax.cond(
                i < nd,
                propose,
                lambda: (jnp.zeros((B, cfg.vocab_size), jnp.float32), jnp.zeros((B,), jnp.int32)),
            )
            return (cache, tail, d_B), (r_B1D[:, 0], d_B, q_BV)

        (cache, tail, _), (r_TBD, d_TB, q_TBV) = jax.lax.scan(
            draft_step, (cache, tail, last_B), jnp.arange(nd + 1)
        )
        # Verify: the full program's steps m.. on the n + 1 residuals, in one pass.
        pos_BT = cache.next_pos[:, None] + jnp.arange(nd + 1)
        z_BTD, cache, _ = walk_cached(
            model, jnp.swapaxes(r_TBD, 0, 1), pos_BT, None, cache, rest_ex, prefill=False
        )
        z_BTV = output_head(cfg, model.params, z_BTD)
        d_BN = jnp.swapaxes(d_TB[:nd], 0, 1)
        if sampler.greedy:
            a_B, emit_BT = _accept_greedy(z_BTV, d_BN)
        else:
            q_BNV = jnp.swapaxes(q_TBV[:nd], 0, 1)
            a_B, emit_BT = _accept_sampled(z_BTV, q_BNV, d_BN, k_accept, sampler)
        # The cache keeps x_0, d_1..d_a of active rows; x_0 of the next round is e_a.
        advance_B = jnp.where(active_B, a_B + 1, 0)
        move = lambda c: _at(c, c.length + advance_B, c.next_pos + advance_B)
        stats = DraftStats(
            stats.accepted + jnp.where(active_B, a_B, 0),
            stats.drafted + jnp.where(active_B, nd, 0),
            stats.rounds + active_B,
        )
        exit_BT = jnp.full(emit_BT.shape, L, jnp.int32)
        state = (move(cache), move(tail), key, stats)
        return state, emit_BT, a_B + 1, {"exit_steps": exit_BT}

    def finish(self, model, draft, state, generation):
        return generation._replace(cache=state[0], draft=state[3])


def _at(cache: KVCache, length_B, pos_B) -> KVCache:
    """The cache with its write indices and positions moved."""
    return cache.replace(length=length_B, next_pos=pos_B)


# ------------------------------------------------------------------ host-side checks
def shared_prefix(model: DepthModel, draft: DepthModel) -> int:
    """The number of leading steps the draft runs exactly as the model does (same program
    entries and per-step parameters), cut back to a parallel-group boundary of both
    programs (residual[m] must be a group's output)."""
    steps_p, steps_q = model.params.get("steps") or {}, draft.params.get("steps") or {}
    if jax.tree.structure(steps_p) != jax.tree.structure(steps_q):
        return 0  # per-step parameters of different kinds: no step is run alike
    columns = lambda m, steps: (
        [np.asarray(getattr(m.program, f)) for f in ("block", "attn", "mlp", "parallel")]
        + [np.asarray(x) for x in jax.tree.leaves(steps)]
    )
    cp, cq = columns(model, steps_p), columns(draft, steps_q)
    P, Q = model.program, draft.program
    m = 0
    while m < min(P.depth, Q.depth) and all(
        np.array_equal(a[m], b[m]) for a, b in zip(cp, cq, strict=True)
    ):
        m += 1
    splits = lambda prog, k: k < prog.depth and bool(np.asarray(prog.parallel)[k])
    while m > 0 and (splits(P, m) or splits(Q, m)):
        m -= 1
    return m


def _same_table(model: DepthModel, draft: DepthModel) -> bool:
    a, b = jax.tree.leaves(model.params["blocks"]), jax.tree.leaves(draft.params["blocks"])
    if jax.tree.structure(model.params["blocks"]) != jax.tree.structure(draft.params["blocks"]):
        return False
    return all(x is y or (x.shape == y.shape and np.array_equal(x, y)) for x, y in zip(a, b))


def draft_model(model: DepthModel, draft) -> tuple[DepthModel, int]:
    """(the draft as a DepthModel over the model's table, the shared prefix m)."""
    if isinstance(draft, (bool, np.bool_)):
        raise GenerationError(f"draft must be a depth k, a Program or a DepthModel, got {draft!r}")
    if isinstance(draft, (int, np.integer)):
        k = int(draft)
        if not 1 <= k < model.depth:
            raise GenerationError(
                f"draft={k}: drafting with the first k steps needs "
                f"1 <= k <= {model.depth - 1} (the program has {model.depth} "
                "steps)"
            )
        if bool(np.asarray(model.program.parallel)[k]):
            raise ProgramError(
                f"draft={k} splits a parallel group (step {k} reads the same "
                f"input as step {k - 1}); draft to a group boundary"
            )
        return select_steps(model, np.arange(k)), k
    if isinstance(draft, Program):
        if not program_lib.is_concrete(draft) or draft.block.ndim != 1:
            raise ProgramError(
                "a draft program must be one concrete program (not traced or batched)"
            )
        program_lib.validate(draft, model.n_blocks)
        if model.params.get("steps") and draft.depth != model.depth:
            raise GenerationError(
                "the model has per-step parameters (params['steps']); pass "
                "the draft as a DepthModel from depthjax.depth so they follow "
                "its steps"
            )
        draft = model.replace(program=draft)
    if not isinstance(draft, DepthModel):
        raise GenerationError(
            f"draft must be a depth k, a Program or a DepthModel, got {type(draft).__name__}"
        )
    if draft.config != model.config or not _same_table(model, draft):
        raise GenerationError(
            "the draft must run over the model's own block table (same config "
            "and blocks: a program or a depthjax.depth edit of the model)"
        )
    m = shared_prefix(model, draft)
    if m == model.depth:
        raise GenerationError(
            "the draft runs the whole full program (and more): it cannot be "
            "cheaper; draft with fewer steps"
        )
    return draft, m


def plan(model: DepthModel, draft: DepthModel, shared: int, draft_tokens: int) -> Plan:
    if (
        isinstance(draft_tokens, bool)
        or not isinstance(draft_tokens, (int, np.integer))
        or draft_tokens < 1
    ):
        raise GenerationError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    tail = tuple(s for s in attention_steps(draft.program) if s >= shared)
    return Plan(
        depth=model.depth,
        shared=shared,
        draft_depth=draft.depth,
        n=int(draft_tokens),
        cache_steps=attention_steps(model.program),
        tail_steps=tail,
    )


# ------------------------------------------------------------------ the compiled loop
def _accept_greedy(z_BTV, d_BN):
    """(accepted a [B], emitted tokens [B, n+1]: valid up to index a) for argmax drafts."""
    target_BT = jnp.argmax(z_BTV, -1).astype(jnp.int32)
    n = d_BN.shape[1]
    a_B = jnp.sum(jnp.cumprod(d_BN == target_BT[:, :n], axis=1), axis=1)
    return a_B, target_BT  # drafts that were accepted equal the targets there


def _accept_sampled(z_BTV, q_logits_BNV, d_BN, key, sampler: Sampler):
    """Rejection sampling: (accepted a [B], emitted tokens [B, n+1], valid up to index a)."""
    B, T, V = z_BTV.shape
    n = T - 1
    p_BTV, q_BNV = sampler.probs(z_BTV), sampler.probs(q_logits_BNV)
    pick = lambda x, i: jnp.take_along_axis(x, i[..., None], -1)[..., 0]
    k_accept, k_fix = jax.random.split(key)
    u_BN = jax.random.uniform(k_accept, (B, n))
    ok_BN = u_BN * pick(q_BNV, d_BN) < pick(p_BTV[:, :n], d_BN)  # u < p/q (q(d) > 0: d ~ q)
    a_B = jnp.sum(jnp.cumprod(ok_BN, axis=1), axis=1)
    # At the first rejection: max(0, p - q) normalized; after n acceptances: p itself.
    q_pad = jnp.concatenate([q_BNV, jnp.zeros((B, 1, V), q_BNV.dtype)], axis=1)
    at = lambda x: jnp.take_along_axis(x, a_B[:, None, None], 1)[:, 0]
    residual_BV = jnp.maximum(at(p_BTV) - at(q_pad), 0.0)
    mass_B1 = residual_BV.sum(-1, keepdims=True)
    dist_BV = jnp.where(mass_B1 > 0, residual_BV, at(p_BTV))
    fix_B = jax.random.categorical(k_fix, jnp.log(dist_BV), axis=-1).astype(jnp.int32)
    j = jnp.arange(T)
    d_BT = jnp.concatenate([d_BN, jnp.zeros((B, 1), jnp.int32)], axis=1)
    return a_B, jnp.where(j[None] < a_B[:, None], d_BT, fix_B[:, None])
