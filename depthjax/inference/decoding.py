"""Autoregressive decoding with a KV cache indexed by program step, and early exit.

    logits_BV, cache = prefill(model, prompt_BT, mask_BT, max_len=64)
    logits_BV, cache, exit_B = decode_step(model, cache, next_token_B)
    out = generate(model, prompt_BT, 32, mask=mask_BT, temperature=0.0)

Decoding walks the program with the same `program_step` as the training forward
(depthjax.core.model), in one `lax.scan` over steps. A step with no cache slot (attention gate
0) skips its attention sublayer entirely (`lax.cond`), so pruned attention costs neither
KV memory nor compute.

Prompts are [B, T] with a 0/1 mask; padding may sit on the left or the right. Positions
count real tokens only, so a padded prompt decodes exactly like the unpadded one.

Early exit (layer skipping, self-speculative drafting):
* ``exit_at=k``: run only the first k steps, then the output head (per call);
* ``exit_threshold=p``: after each candidate exit depth (``exit_steps``, default every
  group boundary), a sequence whose next-token max softmax probability reaches p stops;
  its residual is frozen and the head reads it. Its keys at the steps it skipped are
  marked invalid (``exit_kv="skip"``: later tokens do not see them there, and once every
  sequence of the batch has exited the remaining steps are not run) or computed from the
  frozen hidden state (``exit_kv="propagate"``, CALM's state propagation: all steps run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel, Embed, check_ids, output_head, program_step
from ..core.program import ProgramError, is_concrete
from .kv_cache import KVCache, StepCache, attention_steps
from .sampling import GenerationError, sample
from .specialized import Plan, Specialized, walk as specialized_walk

if TYPE_CHECKING:  # speculative imports this module
    from .speculative import DraftStats


class Generation(NamedTuple):
    tokens: jax.Array  # int32 [B, N]; after `eos_id` the rows hold eos_id
    lengths: jax.Array  # int32 [B]: generated tokens up to and including eos
    exit_steps: jax.Array  # int32 [B, N]: steps run for each token (depth without exit)
    cache: KVCache
    draft: DraftStats | None = None  # self-speculative decoding (draft=): its counts


@dataclasses.dataclass(frozen=True)
class _Exit:
    """Static early-exit settings of one compiled decode function."""

    depth: int  # steps run (exit_at or the program depth)
    cache_steps: tuple[int, ...]  # steps with a cache slot (attention gate != 0)
    checks: tuple[int, ...] = ()  # exit depths at which confidence is tested
    threshold: float | None = None
    kv: str = "skip"
    start: int = 0  # first step run (a walk resumed from residual[start])
    plan: Plan | None = None  # a specialized model's plan (depthjax.inference.specialized)


# ------------------------------------------------------------------ host-side checks
def _unwrap(model) -> tuple[DepthModel, Plan | None]:
    """(the model, its specialized plan or None): decoding takes either."""
    if isinstance(model, Specialized):
        return model.model, model.plan
    return model, None


def _exit_settings(
    model: DepthModel, exit_at, exit_threshold, exit_steps, exit_kv, plan: Plan | None = None
) -> _Exit:
    if plan is not None:
        if exit_threshold is not None or (exit_at is not None and exit_at != model.depth):
            raise GenerationError(
                "a specialized model runs its whole program: early exit "
                "(exit_at, exit_threshold) needs the DepthModel itself"
            )
        return _Exit(model.depth, attention_steps(model.program, model.depth), plan=plan)
    depth = model.depth if exit_at is None else int(exit_at)
    if not 1 <= depth <= model.depth:
        raise GenerationError(f"exit_at={exit_at} outside 1..{model.depth} (program depth)")
    parallel = np.asarray(model.program.parallel) if is_concrete(model.program) else None
    boundary = lambda k: k == model.depth or parallel is None or not parallel[k]
    if not boundary(depth):
        raise ProgramError(
            f"exit_at={depth} splits a parallel group (step {depth} reads the "
            f"same input as step {depth - 1}); exit at a group boundary"
        )
    if exit_kv not in ("skip", "propagate"):
        raise GenerationError(f"exit_kv must be 'skip' or 'propagate', got {exit_kv!r}")
    cache_steps = attention_steps(model.program, depth)
    if exit_threshold is None:
        if exit_steps is not None:
            raise GenerationError("exit_steps given without exit_threshold")
        return _Exit(depth, cache_steps)
    if not 0.0 < float(exit_threshold) <= 1.0:
        raise GenerationError(f"exit_threshold must be in (0, 1], got {exit_threshold}")
    checks = (
        tuple(k for k in range(1, depth) if boundary(k))
        if exit_steps is None
        else tuple(sorted({int(k) for k in exit_steps}))
    )
    for k in checks:
        if not 1 <= k < depth:
            raise GenerationError(f"exit step {k} outside 1..{depth - 1}")
        if not boundary(k):
            raise ProgramError(f"exit step {k} splits a parallel group; use group boundaries")
    return _Exit(depth, cache_steps, checks, float(exit_threshold), exit_kv)


def _check_decodable(model: DepthModel) -> None:
    if not model.config.causal:
        raise GenerationError(
            f"generation needs a causal model; the {model.config.family} config is bidirectional"
        )
    if model.program.block.ndim != 1:
        raise ProgramError(f"decoding takes one program, got a batch {model.program.block.shape}")


def _prompt_mask(model: DepthModel, tokens_BT, mask_BT):
    tokens_BT = jnp.asarray(tokens_BT)
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
        raise GenerationError(
            f"prompt tokens must be int [batch, time], got {tokens_BT.dtype} {tokens_BT.shape}"
        )
    check_ids(tokens_BT, model.config.vocab_size, "prompt tokens", GenerationError)
    mask_BT = jnp.ones(tokens_BT.shape, bool) if mask_BT is None else jnp.asarray(mask_BT)
    if mask_BT.shape != tokens_BT.shape:
        raise GenerationError(f"mask shape {mask_BT.shape} != prompt shape {tokens_BT.shape}")
    lengths = np.asarray(mask_BT).astype(bool).sum(1)
    if (lengths == 0).any():
        raise GenerationError(f"prompts {np.flatnonzero(lengths == 0).tolist()} have no real token")
    return tokens_BT.astype(jnp.int32), mask_BT.astype(bool), int(lengths.max())


def _check_positions(model: DepthModel, longest: int) -> None:
    cfg = model.config
    if cfg.position == "learned" and longest > cfg.max_seq_len:
        raise GenerationError(
            f"prompt + new tokens need {longest} positions; the model has "
            f"max_seq_len={cfg.max_seq_len}"
        )


# ------------------------------------------------------------------ the scanned walk
def _walk(
    model: DepthModel, x_BTD, positions_BT, kv_mask_BT, cache: KVCache, ex: _Exit, *, prefill: bool
):
    """Run steps ex.start..ex.depth-1 on residual[ex.start] = x_BTD, writing the cache.
    Returns (residual_BTD, cache, exit_B)."""
    cfg = model.config
    if not prefill:  # a few queries per sequence: plain XLA attention over the cache
        cfg = dataclasses.replace(cfg, attention_impl="xla")
    B = x_BTD.shape[0]
    if ex.plan is not None:  # a specialized model always walks from the embedding (start 0)
        x_BTD, cache = specialized_walk(
            model.replace(config=cfg),
            ex.plan,
            x_BTD,
            positions_BT,
            cache=cache,
            prefill=prefill,
            kv_mask_BT=kv_mask_BT,
        )
        return x_BTD, cache, jnp.full((B,), ex.depth, jnp.int32)
    params, j, k = model.params, ex.start, ex.depth
    head_params = params  # the exit head reads the same norm / output projection
    xs = (
        jax.tree.map(lambda a: a[j:k], model.program),
        jax.tree.map(lambda a: a[j:k], params.get("steps")),
        jnp.asarray(cache.slot_map()[j:k]),
        jnp.asarray(np.isin(np.arange(j + 1, k + 1), ex.checks)),
    )
    freeze = lambda done, old, new: jax.tree.map(
        lambda o, n: jnp.where(done.reshape((B,) + (1,) * (o.ndim - 1)), o, n), old, new
    )

    def run(residual, kv, done, step_prog, step_params, slot):
        kw = dict(kv_mask_BT=kv_mask_BT)

        def with_attn():
            write = ~done if ex.kv == "skip" else jnp.ones_like(done)
            view = StepCache(kv, slot, write, prefill)
            carry, _, _, view = program_step(
                cfg,
                params["blocks"],
                residual,
                step_prog,
                step_params,
                positions_BT,
                kv_cache=view,
                attn=True,
                **kw,
            )
            return carry, view.cache

        def without_attn():
            carry, _, _ = program_step(
                cfg,
                params["blocks"],
                residual,
                step_prog,
                step_params,
                positions_BT,
                attn=False,
                **kw,
            )
            return carry, kv

        # A cache without slots (no step runs attention) cannot even trace with_attn.
        carry, kv = (
            jax.lax.cond(slot >= 0, with_attn, without_attn) if kv.n_slots else without_attn()
        )
        return (carry if ex.threshold is None else freeze(done, residual, carry)), kv

    def step(state, xs):
        residual, kv, done, exit_B, i = state
        step_prog, step_params, slot, check = xs
        args = (residual, kv, done, step_prog, step_params, slot)
        if ex.threshold is not None and ex.kv == "skip":
            residual, kv = jax.lax.cond(done.all(), lambda *a: (a[0], a[1]), run, *args)
        else:
            residual, kv = run(*args)
        if ex.threshold is not None:

            def confident():
                x_BD = residual[0][:, -1] + residual[1][:, -1]
                logits_BV = output_head(cfg, head_params, x_BD[:, None])[:, 0]
                return jax.nn.softmax(logits_BV).max(-1) >= ex.threshold

            newly = jax.lax.cond(check, confident, lambda: jnp.zeros_like(done)) & ~done
            exit_B = jnp.where(newly, i + 1, exit_B)
            done = done | newly
        return (residual, kv, done, exit_B, i + 1), None

    state = (
        (x_BTD, jnp.zeros_like(x_BTD)),
        cache,
        jnp.zeros((B,), bool),
        jnp.full((B,), k, jnp.int32),
        jnp.asarray(j, jnp.int32),
    )
    ((base, acc), cache, _, exit_B, _), _ = jax.lax.scan(step, state, xs)
    return base + acc, cache, exit_B


@functools.partial(jax.jit, static_argnames=("max_len", "ex"))
def _prefill(model, tokens_BT, mask_BT, *, max_len: int, ex: _Exit):
    cfg = model.config
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
    cache = KVCache.empty(cfg, ex.cache_steps, ex.depth, tokens_BT.shape[0], max_len)
    x_BTD = Embed(cfg).apply({"params": model.params["embed"]}, tokens_BT, positions_BT)
    x_BTD, cache, _ = _walk(model, x_BTD, positions_BT, mask_BT, cache, ex, prefill=True)
    T = tokens_BT.shape[1]
    last_B = T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)  # last real token of each row
    x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
    logits_BV = output_head(cfg, model.params, x_B1D)[:, 0]
    cache = cache.replace(
        length=jnp.full_like(cache.length, T), next_pos=mask_BT.sum(1).astype(jnp.int32)
    )
    return logits_BV, cache


def _decode(model, cache: KVCache, tokens_B, ex: _Exit):
    positions_B1 = cache.next_pos[:, None]
    x_B1D = Embed(model.config).apply(
        {"params": model.params["embed"]}, tokens_B[:, None], positions_B1
    )
    x_B1D, cache, exit_B = _walk(model, x_B1D, positions_B1, None, cache, ex, prefill=False)
    logits_BV = output_head(model.config, model.params, x_B1D)[:, 0]
    cache = cache.replace(length=cache.length + 1, next_pos=cache.next_pos + 1)
    return logits_BV, cache, exit_B


_decode_jit = jax.jit(_decode, static_argnames=("ex",))


# ------------------------------------------------------------------ public API
def prefill(
    model: DepthModel | Specialized, tokens_BT, mask_BT=None, *, max_len: int, exit_at=None
):
    """Run the prompt [B, T] (mask 1 = real token, padding left or right) and build a cache
    with room for `max_len` tokens. Returns (next-token logits float32 [B, V], KVCache).

    exit_at=k: run and cache only the first k steps (per-call early exit). `model` may be
    a `dj.specialize`d model (its plan runs; same cache layout).
    """
    model, plan = _unwrap(model)
    _check_decodable(model)
    tokens_BT, mask_BT, longest = _prompt_mask(model, tokens_BT, mask_BT)
    if max_len < tokens_BT.shape[1]:
        raise GenerationError(
            f"max_len={max_len} is shorter than the prompt ({tokens_BT.shape[1]})"
        )
    _check_positions(model, longest)
    ex = _exit_settings(model, exit_at, None, None, "skip", plan)
    return _prefill(model, tokens_BT, mask_BT, max_len=max_len, ex=ex)


def decode_step(
    model: DepthModel | Specialized,
    cache: KVCache,
    tokens_B,
    *,
    exit_at=None,
    exit_threshold=None,
    exit_steps=None,
    exit_kv: str = "skip",
):
    """Feed one token per sequence. Returns (logits float32 [B, V], cache, exit_B), where
    exit_B int32 [B] is the number of steps each sequence ran (see module docstring)."""
    model, plan = _unwrap(model)
    _check_decodable(model)
    ex = _exit_settings(model, exit_at, exit_threshold, exit_steps, exit_kv, plan)
    cache.check_program(model.program, ex.depth)
    tokens_B = jnp.asarray(tokens_B)
    if tokens_B.shape != cache.next_pos.shape or not jnp.issubdtype(tokens_B.dtype, jnp.integer):
        raise GenerationError(
            f"decode_step takes int tokens [{cache.next_pos.shape[0]}], got "
            f"{tokens_B.dtype} {tokens_B.shape}"
        )
    check_ids(tokens_B, model.config.vocab_size, "tokens", GenerationError)
    if is_concrete(cache) and int(cache.length.max()) >= cache.max_len:
        raise GenerationError(f"the cache is full ({cache.max_len} tokens)")
    return _decode_jit(model, cache, tokens_B.astype(jnp.int32), ex=ex)


def generate(
    model: DepthModel | Specialized,
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
) -> Generation:
    """Sample `max_new_tokens` tokens after each prompt row, in one compiled loop.

    prompt_tokens int [B, T] with `mask` (1 = real token; padding left or right).
    temperature=0 is greedy; top_k / top_p filter before sampling (see depthjax.inference.sampling).
    A row stops at `eos_id` (later tokens are eos_id); the loop ends when every row has.

    draft=k (or a Program / DepthModel over the same table): self-speculative decoding,
    `draft_tokens` proposals per round by the draft, verified by the full program in one
    pass (depthjax.inference.speculative). The output is the full model's: token for token at
    temperature 0, in distribution when sampling. `Generation.draft` holds the counts.
    `model` may be a `dj.specialize`d model: prefill and decoding then run its plan.
    """
    model, plan = _unwrap(model)
    _check_decodable(model)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature != 0 and key is None:
        raise GenerationError("sampling (temperature > 0) needs a PRNG key")
    if eos_id is not None and not (
        isinstance(eos_id, (int, np.integer)) and 0 <= eos_id < model.config.vocab_size
    ):
        raise GenerationError(
            f"eos_id={eos_id!r} is not a token of the vocabulary 0..{model.config.vocab_size - 1}"
        )
    tokens_BT, mask_BT, longest = _prompt_mask(model, prompt_tokens, mask)
    _check_positions(model, longest + max_new_tokens - 1)
    if draft is not None:
        if plan is not None:
            raise GenerationError(
                "draft= (self-speculative decoding) walks the program "
                "step by step; pass the model, not its dj.specialize form"
            )
        return _speculate(
            model,
            draft,
            draft_tokens,
            tokens_BT,
            mask_BT,
            key,
            max_new_tokens,
            eos_id,
            dict(
                temperature=float(temperature),
                top_k=top_k,
                top_p=None if top_p is None else float(top_p),
            ),
            early_exit=(exit_at, exit_threshold, exit_steps),
        )
    prefill_ex = _exit_settings(model, exit_at, None, None, exit_kv, plan)
    ex = _exit_settings(model, exit_at, exit_threshold, exit_steps, exit_kv, plan)
    key = jax.random.key(0) if key is None else key
    sampler = dict(
        temperature=float(temperature), top_k=top_k, top_p=None if top_p is None else float(top_p)
    )
    return _generate(
        model,
        tokens_BT,
        mask_BT,
        key,
        max_new_tokens=max_new_tokens,
        prefill_ex=prefill_ex,
        ex=ex,
        eos_id=eos_id,
        sampler=tuple(sampler.items()),
    )


def _speculate(
    model, draft, draft_tokens, tokens_BT, mask_BT, key, max_new_tokens, eos_id, sampler, early_exit
):
    from . import speculative

    if any(x is not None for x in early_exit):
        raise GenerationError(
            "draft= (self-speculative decoding) cannot be combined with "
            "exit_at / exit_threshold / exit_steps"
        )
    draft_model, shared = speculative.draft_model(model, draft)
    plan = speculative.plan(model, draft_model, shared, draft_tokens)
    key = jax.random.key(0) if key is None else key
    return speculative.generate(
        model,
        draft_model,
        tokens_BT,
        mask_BT,
        key,
        max_new_tokens=max_new_tokens,
        plan=plan,
        eos_id=eos_id,
        sampler=tuple(sampler.items()),
    )


@functools.partial(
    jax.jit, static_argnames=("max_new_tokens", "prefill_ex", "ex", "eos_id", "sampler")
)
def _generate(model, tokens_BT, mask_BT, key, *, max_new_tokens, prefill_ex, ex, eos_id, sampler):
    B, T = tokens_BT.shape
    N = max_new_tokens
    logits_BV, cache = _prefill(model, tokens_BT, mask_BT, max_len=T + N - 1, ex=prefill_ex)
    pad = 0 if eos_id is None else eos_id
    state = dict(
        i=jnp.zeros((), jnp.int32),
        logits=logits_BV,
        cache=cache,
        key=key,
        tokens=jnp.full((B, N), pad, jnp.int32),
        exits=jnp.full((B, N), ex.depth, jnp.int32),
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        exit_B=jnp.full((B,), ex.depth, jnp.int32),
    )

    def body(s):
        key, sub = jax.random.split(s["key"])
        tok_B = jnp.where(s["done"], pad, sample(s["logits"], sub, **dict(sampler)))
        s = dict(
            s,
            key=key,
            tokens=s["tokens"].at[:, s["i"]].set(tok_B),
            exits=s["exits"].at[:, s["i"]].set(jnp.where(s["done"], 0, s["exit_B"])),
            lengths=s["lengths"] + ~s["done"],
        )
        done = s["done"] if eos_id is None else s["done"] | (tok_B == eos_id)
        # The last token is never fed back: its keys would not be read.
        logits, cache, exit_B = jax.lax.cond(
            s["i"] + 1 < N,
            lambda: _decode(model, s["cache"], tok_B, ex),
            lambda: (s["logits"], s["cache"], s["exit_B"]),
        )
        return dict(s, i=s["i"] + 1, logits=logits, cache=cache, exit_B=exit_B, done=done)

    s = jax.lax.while_loop(lambda s: (s["i"] < N) & ~s["done"].all(), body, state)
    return Generation(s["tokens"], s["lengths"], s["exits"], s["cache"])
