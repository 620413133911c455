"""Decoding with a KV cache indexed by program step, and early exit.

    logits_BV, cache = prefill(model, prompt_BT, mask_BT, max_len=64)
    logits_BV, cache, exit_B = decode_step(model, cache, next_token_B)

`walk_cached` walks the program with the one walker (depthjax.core.walk) and a cache
policy: a step with no cache slot (attention gate 0) skips its attention sublayer entirely
(`lax.cond`), so pruned attention costs neither KV memory nor compute. `dj.generate`
(depthjax.inference.driver) drives it token by token; self-speculative decoding walks
parts of the program with it.

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

import jax
import jax.numpy as jnp
import numpy as np

from ..core import walk as walk_lib
from ..core.model import DepthModel, check_ids, embed, output_head
from ..core.program import ProgramError, is_concrete
from .kv_cache import KVCache, StepCache, attention_steps
from .sampling import GenerationError
from .specialized import Plan, Specialized, run_plan


@dataclasses.dataclass(frozen=True)
class Exit:
    """Static early-exit settings of one compiled decode function."""

    depth: int  # steps run (exit_at or the program depth)
    cache_steps: tuple[int, ...]  # steps with a cache slot (attention gate != 0)
    checks: tuple[int, ...] = ()  # exit depths at which confidence is tested
    threshold: float | None = None
    kv: str = "skip"
    start: int = 0  # first step run (a walk resumed from residual[start])
    plan: Plan | None = None  # a specialized model's plan (depthjax.inference.specialized)


# ------------------------------------------------------------------ host-side checks
def unwrap(model) -> tuple[DepthModel, Plan | None]:
    """(the model, its specialized plan or None): decoding takes either."""
    if isinstance(model, Specialized):
        return model.model, model.plan
    return model, None


def exit_settings(
    model: DepthModel, exit_at, exit_threshold, exit_steps, exit_kv, plan: Plan | None = None
) -> Exit:
    if plan is not None:
        if exit_threshold is not None or (exit_at is not None and exit_at != model.depth):
            raise GenerationError(
                "a specialized model runs its whole program: early exit "
                "(exit_at, exit_threshold) needs the DepthModel itself"
            )
        return Exit(model.depth, attention_steps(model.program, model.depth), plan=plan)
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
        return Exit(depth, cache_steps)
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
    return Exit(depth, cache_steps, checks, float(exit_threshold), exit_kv)


def check_decodable(model: DepthModel) -> None:
    if not model.config.causal:
        raise GenerationError(
            f"generation needs a causal model; the {model.config.family} config is bidirectional"
        )
    if model.program.block.ndim != 1:
        raise ProgramError(f"decoding takes one program, got a batch {model.program.block.shape}")


def prompt_mask(model: DepthModel, tokens_BT, mask_BT):
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


def check_positions(model: DepthModel, longest: int) -> None:
    cfg = model.config
    if cfg.position == "learned" and longest > cfg.max_seq_len:
        raise GenerationError(
            f"prompt + new tokens need {longest} positions; the model has "
            f"max_seq_len={cfg.max_seq_len}"
        )


# ------------------------------------------------------------------ the scanned walk
def walk_cached(
    model: DepthModel, x_BTD, positions_BT, kv_mask_BT, cache: KVCache, ex: Exit, *, prefill: bool
):
    """Run steps ex.start..ex.depth-1 on residual[ex.start] = x_BTD, writing the cache.
    Returns (residual_BTD, cache, exit_B)."""
    cfg = model.config
    if not prefill:  # a few queries per sequence: plain XLA attention over the cache
        cfg = dataclasses.replace(cfg, attention_impl="xla")
    B = x_BTD.shape[0]
    if ex.plan is not None:  # a specialized model always walks from the embedding (start 0)
        x_BTD, cache = run_plan(
            model.replace(config=cfg),
            ex.plan,
            x_BTD,
            positions_BT,
            cache=cache,
            prefill=prefill,
            kv_mask_BT=kv_mask_BT,
        )
        return x_BTD, cache, jnp.full((B,), ex.depth, jnp.int32)
    j, k = ex.start, ex.depth
    freeze = lambda done, old, new: jax.tree.map(
        lambda o, n: jnp.where(done.reshape((B,) + (1,) * (o.ndim - 1)), o, n), old, new
    )

    def run(step: walk_lib.Step, carry, kv, done, slot):
        def with_attn():
            write = ~done if ex.kv == "skip" else jnp.ones_like(done)
            new, _, _, view = step.run(
                carry, kv_cache=StepCache(kv, slot, write, prefill), attn=True
            )
            return new, view.cache

        def without_attn():
            return step.run(carry, attn=False)[0], kv

        # A cache without slots (no step runs attention) cannot even trace with_attn.
        new, kv = jax.lax.cond(slot >= 0, with_attn, without_attn) if kv.n_slots else without_attn()
        return (new if ex.threshold is None else freeze(done, carry, new)), kv

    def policy(step: walk_lib.Step, carry, state, xs):
        """Cache policy: (kv, done, exit_B) state; xs = (step index, cache slot, whether
        an exit is tested after this step)."""
        kv, done, exit_B = state
        i, slot, check = xs
        if ex.threshold is not None and ex.kv == "skip":  # a batch that exited stops here
            carry, kv = jax.lax.cond(
                done.all(), lambda: (carry, kv), lambda: run(step, carry, kv, done, slot)
            )
        else:
            carry, kv = run(step, carry, kv, done, slot)
        if ex.threshold is not None:

            def confident():  # the exit head reads the model's own final norm and head
                x_B1D = step.residual(carry)[:, -1:]
                logits_BV = output_head(cfg, model.params, x_B1D)[:, 0]
                return jax.nn.softmax(logits_BV).max(-1) >= ex.threshold

            newly = jax.lax.cond(check, confident, lambda: jnp.zeros_like(done)) & ~done
            exit_B = jnp.where(newly, i + 1, exit_B)
            done = done | newly
        return carry, (kv, done, exit_B), None

    cut = lambda a: a[j:k]
    x_BTD, (cache, _, exit_B), _ = walk_lib.walk(
        cfg,
        model.params["blocks"],
        jax.tree.map(cut, model.program),
        jax.tree.map(cut, model.params.get("steps")),
        x_BTD,
        positions_BT,
        policy=policy,
        state=(cache, jnp.zeros((B,), bool), jnp.full((B,), k, jnp.int32)),
        xs=(
            jnp.arange(j, k, dtype=jnp.int32),
            jnp.asarray(cache.slot_map()[j:k]),
            jnp.asarray(np.isin(np.arange(j + 1, k + 1), ex.checks)),
        ),
        kv_mask_BT=kv_mask_BT,
    )
    return x_BTD, cache, exit_B


def prompt_positions(mask_BT):
    """int32 [B, T]: each token's position, counting real tokens only (padding left or
    right decodes like the unpadded prompt)."""
    return jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)


def last_real(x_BT, mask_BT):
    """x [B, T, ...] at each row's last real token -> [B, 1, ...]."""
    last_B = x_BT.shape[1] - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1)
    idx = last_B.reshape((-1, 1) + (1,) * (x_BT.ndim - 2))
    return jnp.take_along_axis(x_BT, idx, axis=1)


def prefill_walk(model: DepthModel, x_BTD, positions_BT, mask_BT, ex: Exit, max_len: int):
    """The prompt's residual x [B, T, D] walked through steps ex.start..ex.depth-1 into a new
    cache with room for `max_len` tokens. Returns (residual_BTD, cache)."""
    cache = KVCache.empty(model.config, ex.cache_steps, ex.depth, x_BTD.shape[0], max_len)
    x_BTD, cache, _ = walk_cached(model, x_BTD, positions_BT, mask_BT, cache, ex, prefill=True)
    cache = cache.replace(
        length=jnp.full_like(cache.length, x_BTD.shape[1]),
        next_pos=mask_BT.sum(1).astype(jnp.int32),
    )
    return x_BTD, cache


def decode_walk(model: DepthModel, cache: KVCache, x_B1D, ex: Exit):
    """One fed token's residual x [B, 1, D] (at positions cache.next_pos) walked through the
    cached steps. Returns (residual_B1D, cache advanced by one token, exit_B)."""
    positions_B1 = cache.next_pos[:, None]
    x_B1D, cache, exit_B = walk_cached(model, x_B1D, positions_B1, None, cache, ex, prefill=False)
    cache = cache.replace(length=cache.length + 1, next_pos=cache.next_pos + 1)
    return x_B1D, cache, exit_B


@functools.partial(jax.jit, static_argnames=("max_len", "ex"))
def prefill_jitted(model, tokens_BT, mask_BT, *, max_len: int, ex: Exit):
    positions_BT = prompt_positions(mask_BT)
    x_BTD = embed(model, tokens_BT, positions_BT)
    x_BTD, cache = prefill_walk(model, x_BTD, positions_BT, mask_BT, ex, max_len)
    logits_BV = output_head(model.config, model.params, last_real(x_BTD, mask_BT))[:, 0]
    return logits_BV, cache


def decode(model, cache: KVCache, tokens_B, ex: Exit):
    x_B1D = embed(model, tokens_B[:, None], cache.next_pos[:, None])
    x_B1D, cache, exit_B = decode_walk(model, cache, x_B1D, ex)
    logits_BV = output_head(model.config, model.params, x_B1D)[:, 0]
    return logits_BV, cache, exit_B


_decode_jitted = jax.jit(decode, static_argnames=("ex",))


# ------------------------------------------------------------------ public API
def prefill(
    model: DepthModel | Specialized, tokens_BT, mask_BT=None, *, max_len: int, exit_at=None
):
    """Run the prompt [B, T] (mask 1 = real token, padding left or right) and build a cache
    with room for `max_len` tokens. Returns (next-token logits float32 [B, V], KVCache).

    exit_at=k: run and cache only the first k steps (per-call early exit). `model` may be
    a `dj.specialize`d model (its plan runs; same cache layout).
    """
    model, plan = unwrap(model)
    check_decodable(model)
    tokens_BT, mask_BT, longest = prompt_mask(model, tokens_BT, mask_BT)
    if max_len < tokens_BT.shape[1]:
        raise GenerationError(
            f"max_len={max_len} is shorter than the prompt ({tokens_BT.shape[1]})"
        )
    check_positions(model, longest)
    ex = exit_settings(model, exit_at, None, None, "skip", plan)
    return prefill_jitted(model, tokens_BT, mask_BT, max_len=max_len, ex=ex)


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
    model, plan = unwrap(model)
    check_decodable(model)
    ex = exit_settings(model, exit_at, exit_threshold, exit_steps, exit_kv, plan)
    cache.check_program(model.program, ex.depth)
    tokens_B = step_tokens(model, tokens_B, cache.next_pos, cache.length, cache.max_len)
    return _decode_jitted(model, cache, tokens_B, ex=ex)


def step_tokens(model: DepthModel, tokens_B, next_pos_B, length, max_len: int):
    """The checked int32 [B] tokens of one decode step over a cache holding `length` of its
    `max_len` entries."""
    tokens_B = jnp.asarray(tokens_B)
    if tokens_B.shape != next_pos_B.shape or not jnp.issubdtype(tokens_B.dtype, jnp.integer):
        raise GenerationError(
            f"decode_step takes int tokens [{next_pos_B.shape[0]}], got "
            f"{tokens_B.dtype} {tokens_B.shape}"
        )
    check_ids(tokens_B, model.config.vocab_size, "tokens", GenerationError)
    if is_concrete(length) and int(jnp.max(length)) >= max_len:
        raise GenerationError(f"the cache is full ({max_len} tokens)")
    return tokens_B.astype(jnp.int32)
