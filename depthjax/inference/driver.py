"""`dj.generate`: the one decode driver, with decoding policies that plug into it.

    out = dj.generate(model, prompt_BT, 32, mask=mask_BT, temperature=0.0)
    out = dj.generate(model, prompt_BT, 32, exit_threshold=0.9)          # early exit
    out = dj.generate(model, prompt_BT, 32, draft=4)                     # self-speculative
    out = dj.generate(model, prompt_BT, 32, policy=routed_decode.Routed(mod=spec))  # MoD
    out = dj.generate(model, prompt_BT, 32, policy=recurrent_decode.Looped(rec, tol=0.05))

The driver owns what every way of decoding shares: the prompt checks (ids, mask, padding
left or right), the sampler's settings, the output buffers, stopping (max_new_tokens and
`eos_id`, per row) and the compiled while-loop. A policy owns how tokens are produced: it
is asked once to start (prefill the prompt and propose each row's first token) and then,
until every row is done, to advance (emit 0..K more tokens per row).

Policy protocol (a user-facing object with `prepare`; the adaptive ones live in
depthjax.adaptive):

    policy.prepare(model, tokens_BT, mask_BT, max_new_tokens) -> (decoder, data)

on the host: checks, and the static `decoder` (hashable: one compile per setting) plus its
array `data`. Then, traced inside the loop:

    decoder.start(model, data, tokens_BT, mask_BT, key, n=, sampler=)
        -> (state, first_B int32 [B], info {name: [B, ...]})
    decoder.advance(model, data, state, last_B, active_B, n=, sampler=)
        -> (state, emit_BK int32 [B, K], count_B int32 [B], info {name: [B, K, ...]})
    decoder.finish(model, data, state, generation) -> Generation

`last_B` is each row's last emitted token (the one to feed), `active_B` the rows not yet
done. `info` holds per-token records (exit_steps: steps run to produce the token; ran:
which steps ran), written beside the tokens. `finish` adds the policy's own results (the
cache, draft statistics, loop counts).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel, embed, output_head
from ..core.stitched import Stitched
from . import cached, speculative
from .kv_cache import KVCache
from .sampling import GenerationError, Sampler
from .specialized import Specialized
from .speculative import DraftStats


class Generation(NamedTuple):
    tokens: jax.Array  # int32 [B, N]; after `eos_id` the rows hold eos_id
    lengths: jax.Array  # int32 [B]: generated tokens up to and including eos
    exit_steps: jax.Array  # int32 [B, N]: steps run for each token (0: not generated)
    cache: KVCache | None = None  # the policy's cache after the last fed token (stitched: a pair)
    draft: DraftStats | None = None  # self-speculative decoding (draft=): its counts
    ran: jax.Array | None = None  # bool [B, N, depth]: steps the token's input ran (routed)
    loops: jax.Array | None = None  # int32 [B, T + N - 1]: core loops per fed token (looped)
    ticks: jax.Array | None = None  # int32 []: core iterations after the prompt (looped)


class TokenByToken(abc.ABC):
    """A decoder that feeds one token per row at a time: subclasses give `prefill` and
    `decode`; sampling (one key split per token) and the records are shared."""

    @abc.abstractmethod
    def prefill(self, model, data, tokens_BT, mask_BT, max_len: int):
        """-> (next-token logits [B, V], cache, info {name: [B, ...]})."""

    @abc.abstractmethod
    def decode(self, model, data, cache, tokens_B):
        """-> (next-token logits [B, V], cache, info {name: [B, ...]})."""

    def start(self, model, data, tokens_BT, mask_BT, key, *, n, sampler: Sampler):
        max_len = tokens_BT.shape[1] + n - 1  # the last token is never fed back
        logits_BV, cache, info = self.prefill(model, data, tokens_BT, mask_BT, max_len)
        key, sub = jax.random.split(key)
        return (cache, key), sampler.sample(logits_BV, sub), info

    def advance(self, model, data, state, last_B, active_B, *, n, sampler: Sampler):
        cache, key = state
        logits_BV, cache, info = self.decode(model, data, cache, last_B)
        key, sub = jax.random.split(key)
        tok_B = sampler.sample(logits_BV, sub)
        info = jax.tree.map(lambda x: x[:, None], info)
        return (cache, key), tok_B[:, None], jnp.ones_like(tok_B), info

    def finish(self, model, data, state, generation: Generation) -> Generation:
        return generation._replace(cache=state[0])


@dataclasses.dataclass(frozen=True)
class Plain(TokenByToken):
    """The default policy: the program over a KV cache by step, one token per row at a
    time, with early exit (`exit_at`, `exit_threshold`; see depthjax.inference.cached)."""

    prefill_ex: cached.Exit
    ex: cached.Exit

    def prepare(self, model, tokens_BT, mask_BT, max_new_tokens):
        return self, None

    def prefill(self, model, data, tokens_BT, mask_BT, max_len):
        logits_BV, cache = cached.prefill_jitted(
            model, tokens_BT, mask_BT, max_len=max_len, ex=self.prefill_ex
        )
        exit_B = jnp.full(logits_BV.shape[:1], self.prefill_ex.depth, jnp.int32)
        return logits_BV, cache, {"exit_steps": exit_B}

    def decode(self, model, data, cache, tokens_B):
        logits_BV, cache, exit_B = cached.decode(model, cache, tokens_B, self.ex)
        return logits_BV, cache, {"exit_steps": exit_B}


@dataclasses.dataclass(frozen=True)
class Stitching(TokenByToken):
    """The policy of a stitched model (dj.depth.stitch), chosen by `generate` itself: each
    part walks its program over its own KV cache (`cached.prefill_walk` / `decode_walk`)
    and the stitching map joins them token by token. `Generation.cache` is the pair
    (front cache, back cache); `front` / `back` are each part's static cache layout."""

    front: cached.Exit
    back: cached.Exit

    @classmethod
    def create(cls, model: Stitched) -> Stitching:
        layout = lambda m: cached.exit_settings(m, None, None, None, "skip")
        return cls(layout(model.front), layout(model.back))

    def prepare(self, model, tokens_BT, mask_BT, max_new_tokens):
        return self, None

    def _steps(self, x_B):
        return {"exit_steps": jnp.full(x_B.shape[:1], self.front.depth + self.back.depth)}

    def prefill(self, model: Stitched, data, tokens_BT, mask_BT, max_len):
        front, back = model.parts
        positions_BT = cached.prompt_positions(mask_BT)
        x_BTD = embed(front, tokens_BT, positions_BT)
        x_BTD, kv_front = cached.prefill_walk(
            front, x_BTD, positions_BT, mask_BT, self.front, max_len
        )
        x_BTD, kv_back = cached.prefill_walk(
            back, model.map(x_BTD), positions_BT, mask_BT, self.back, max_len
        )
        logits_BV = output_head(back.config, back.params, cached.last_real(x_BTD, mask_BT))[:, 0]
        return logits_BV, (kv_front, kv_back), self._steps(tokens_BT)

    def decode(self, model: Stitched, data, cache, tokens_B):
        (front, back), (kv_front, kv_back) = model.parts, cache
        x_B1D = embed(front, tokens_B[:, None], kv_front.next_pos[:, None])
        x_B1D, kv_front, _ = cached.decode_walk(front, kv_front, x_B1D, self.front)
        x_B1D, kv_back, _ = cached.decode_walk(back, kv_back, model.map(x_B1D), self.back)
        logits_BV = output_head(back.config, back.params, x_B1D)[:, 0]
        return logits_BV, (kv_front, kv_back), self._steps(tokens_B)


def _check_length(max_new_tokens) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def generate(
    model: DepthModel | Specialized | Stitched,
    prompt_tokens,
    max_new_tokens: int,
    *,
    mask=None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key=None,
    eos_id: int | None = None,
    exit_at=None,
    exit_threshold=None,
    exit_steps=None,
    exit_kv: str = "skip",
    draft=None,
    draft_tokens: int = 4,
    policy=None,
) -> Generation:
    """Sample `max_new_tokens` tokens after each prompt row, in one compiled loop.

    prompt_tokens int [B, T] with `mask` (1 = real token; padding left or right).
    temperature=0 is greedy; top_k / top_p filter before sampling (depthjax.inference.
    sampling). A row stops at `eos_id` (later tokens are eos_id); the loop ends when every
    row has. `model` may be a `dj.specialize`d model: prefill and decoding run its plan;
    or a stitched model (dj.depth.stitch), decoded by the `Stitching` policy.

    How tokens are produced is a policy (module docstring):
    * default: the program with a KV cache; exit_at / exit_threshold / exit_steps / exit_kv
      for early exit (depthjax.inference.cached);
    * draft=k (or a Program / DepthModel over the same table): self-speculative decoding,
      `draft_tokens` proposals per round, verified by the full program in one pass
      (depthjax.inference.speculative); the output is the full model's (token for token
      at temperature 0, in distribution when sampling); `Generation.draft` holds counts;
    * policy=...: any other policy object, e.g. depthjax.adaptive.routed_decode.Routed
      (Mixture-of-Depths routing, per-row programs such as FiRST's) or
      depthjax.adaptive.recurrent_decode.Looped (recurrent depth, a loop count per token).
    """
    model, plan = cached.unwrap(model)
    parts = model.parts if isinstance(model, Stitched) else (model,)
    for part in parts:
        cached.check_decodable(part)
    _check_length(max_new_tokens)
    sampler = Sampler.create(temperature, top_k, top_p)
    if not sampler.greedy and key is None:
        raise GenerationError("sampling (temperature > 0) needs a PRNG key")
    if eos_id is not None and not (
        isinstance(eos_id, (int, np.integer))
        and not isinstance(eos_id, bool)
        and 0 <= eos_id < model.config.vocab_size
    ):
        raise GenerationError(
            f"eos_id={eos_id!r} is not a token of the vocabulary 0..{model.config.vocab_size - 1}"
        )
    tokens_BT, mask_BT, longest = cached.prompt_mask(model, prompt_tokens, mask)
    for part in parts:
        cached.check_positions(part, longest + max_new_tokens - 1)
    early_exit = (exit_at, exit_threshold, exit_steps)
    chosen = [
        name
        for name, on in (
            ("draft=", draft is not None),
            ("policy=", policy is not None),
            ("exit_at / exit_threshold / exit_steps", any(x is not None for x in early_exit)),
        )
        if on
    ]
    if len(chosen) > 1:
        raise GenerationError(
            f"{chosen[0]} cannot be combined with {' or '.join(chosen[1:])}: choose one policy"
        )
    if plan is not None and (draft is not None or policy is not None):
        raise GenerationError(
            "draft= and policy= walk the program step by step; pass the model, not its "
            "dj.specialize form"
        )
    if isinstance(model, Stitched):
        if chosen:
            raise GenerationError(
                f"{chosen[0]} walks one program; a stitched model (dj.depth.stitch) decodes "
                "its two parts with its own policy"
            )
        policy = Stitching.create(model)
    elif draft is not None:
        policy = speculative.Draft(draft, draft_tokens)
    elif policy is None:
        policy = Plain(
            cached.exit_settings(model, exit_at, None, None, exit_kv, plan),
            cached.exit_settings(model, exit_at, exit_threshold, exit_steps, exit_kv, plan),
        )
    elif not hasattr(policy, "prepare"):
        raise GenerationError(
            f"policy must be a decoding policy (an object with prepare(), e.g. "
            f"depthjax.adaptive.routed_decode.Routed), got {type(policy).__name__}"
        )
    decoder, data = policy.prepare(model, tokens_BT, mask_BT, int(max_new_tokens))
    key = jax.random.key(0) if key is None else key
    return _run(
        decoder,
        model,
        data,
        tokens_BT,
        mask_BT,
        key,
        n=int(max_new_tokens),
        eos_id=None if eos_id is None else int(eos_id),
        sampler=sampler,
    )


@functools.partial(jax.jit, static_argnames=("decoder", "n", "eos_id", "sampler"))
def _run(decoder, model, data, tokens_BT, mask_BT, key, *, n, eos_id, sampler):
    B = tokens_BT.shape[0]
    state, first_B, info_B = decoder.start(
        model, data, tokens_BT, mask_BT, key, n=n, sampler=sampler
    )
    pad = 0 if eos_id is None else eos_id
    done_B = jnp.full((B,), n == 1)
    if eos_id is not None:
        done_B = done_B | (first_B == eos_id)
    buffer = lambda x: jnp.zeros((B, n) + x.shape[1:], x.dtype).at[:, 0].set(x)
    s = dict(
        state=state,
        tokens=jnp.full((B, n), pad, jnp.int32).at[:, 0].set(first_B),
        info={name: buffer(x) for name, x in info_B.items()},
        emitted=jnp.ones((B,), jnp.int32),
        done=done_B,
    )

    def body(s):
        last_B = jnp.take_along_axis(s["tokens"], s["emitted"][:, None] - 1, axis=1)[:, 0]
        active_B = ~s["done"]
        state, emit_BK, count_B, info_BK = decoder.advance(
            model, data, s["state"], last_B, active_B, n=n, sampler=sampler
        )
        # Emit count tokens per active row: fewer at eos or at max_new_tokens.
        j_K = jnp.arange(emit_BK.shape[1])
        stop_B = jnp.zeros((B,), bool)
        if eos_id is not None:
            is_eos_BK = (emit_BK == eos_id) & (j_K[None] < count_B[:, None])
            stop_B = is_eos_BK.any(1)
            count_B = jnp.where(stop_B, jnp.argmax(is_eos_BK, 1) + 1, count_B)
        count_B = jnp.where(active_B, jnp.minimum(count_B, n - s["emitted"]), 0)
        where_BK = jnp.where(j_K[None] < count_B[:, None], s["emitted"][:, None] + j_K[None], n)
        rows_BK = jnp.broadcast_to(jnp.arange(B)[:, None], where_BK.shape)
        put = lambda buf, x: buf.at[rows_BK, where_BK].set(x.astype(buf.dtype), mode="drop")
        emitted = s["emitted"] + count_B
        return dict(
            state=state,
            tokens=put(s["tokens"], emit_BK),
            info={name: put(buf, info_BK[name]) for name, buf in s["info"].items()},
            emitted=emitted,
            done=s["done"] | (emitted >= n) | (stop_B & active_B),
        )

    s = jax.lax.while_loop(lambda s: ~s["done"].all(), body, s)
    info = dict(s["info"])
    exit_steps = info.pop("exit_steps", jnp.zeros((B, n), jnp.int32))
    out = Generation(s["tokens"], s["emitted"], exit_steps, **info)
    return decoder.finish(model, data, s["state"], out)
