"""The KV cache for decoding, indexed by program step (never by block id).

Only steps whose attention gate is non-zero get a slot: a looped block has one slot per
step it runs at, and a program with a third of its attention sublayers gated off holds
exactly a third fewer KV bytes. The slot map is static (computed on the host from the
concrete program) and travels with the cache as pytree metadata.

Layout: k, v [N slots, B, S, K, Dh]; `valid` [N, B, S] says which keys a query may see
(prompt padding and tokens that exited early before reaching a step are invalid). Each
sequence writes at its own cache index `length[b]` and has its own position counter
`next_pos[b]` for RoPE / learned positions, so left and right padding both work, and so do
rows that advance by different numbers of tokens (self-speculative decoding accepts a
different number of draft tokens per row). A query at cache index i sees the valid keys
at indices <= i: entries past a row's length (drafts it rejected) are never read and are
overwritten by the next tokens it writes.
`positions` [B, S] holds each entry's position (written with its keys): a row with a
sliding window lets a query see the keys within `window` positions of its own (padding
does not count).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core.config import ModelConfig
from ..core.program import Program, ProgramError, is_concrete


def attention_steps(program: Program, depth: int | None = None) -> tuple[int, ...]:
    """The steps (among the first `depth`) whose attention sublayer runs: gate != 0."""
    if not is_concrete(program):
        raise ProgramError("the KV cache layout needs a concrete program (not a traced one)")
    if program.block.ndim != 1:
        raise ProgramError(f"decoding takes one program, got a batch {program.block.shape}")
    attn = np.asarray(program.attn)[:depth]
    return tuple(int(i) for i in np.flatnonzero(attn != 0))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "valid", "length", "next_pos", "positions"],
    meta_fields=["steps", "depth"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [N, B, S, K, Dh]
    v: jax.Array  # [N, B, S, K, Dh]
    valid: jax.Array  # bool [N, B, S]
    length: jax.Array  # int32 [B]: cache index each sequence writes its next token at
    next_pos: jax.Array  # int32 [B]: position of each sequence's next token
    positions: jax.Array  # int32 [B, S]: position of each cache entry
    steps: tuple[int, ...]  # slot n belongs to program step steps[n]
    depth: int  # the cache covers program steps 0..depth-1

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        program: Program,
        batch: int,
        max_len: int,
        *,
        depth: int | None = None,
    ) -> KVCache:
        """An empty cache for `program` (its first `depth` steps): one slot per attention step."""
        depth = program.depth if depth is None else depth
        if not 1 <= depth <= program.depth:
            raise ValueError(f"cache depth {depth} outside 1..{program.depth} (program depth)")
        return cls.empty(cfg, attention_steps(program, depth), depth, batch, max_len)

    @classmethod
    def empty(
        cls, cfg: ModelConfig, steps: tuple[int, ...], depth: int, batch: int, max_len: int
    ) -> KVCache:
        """An empty cache with slots for `steps` (works under jit: the layout is static)."""
        shape = (len(steps), batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, cfg.dtype),
            v=jnp.zeros(shape, cfg.dtype),
            valid=jnp.zeros(shape[:3], bool),
            length=jnp.zeros((batch,), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
            positions=jnp.zeros((batch, max_len), jnp.int32),
            steps=steps,
            depth=depth,
        )

    @property
    def n_slots(self) -> int:
        return len(self.steps)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (the `valid` mask adds N*B*S bytes)."""
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize

    def slot_map(self) -> np.ndarray:
        """int32 [depth]: the slot of each step, -1 for steps without attention."""
        slots = np.full(self.depth, -1, np.int32)
        slots[list(self.steps)] = np.arange(self.n_slots)
        return slots

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)

    def check_program(self, program: Program, depth: int) -> None:
        """Raise if running `depth` steps of `program` needs a slot this cache lacks."""
        if depth > self.depth:
            raise ValueError(f"the cache covers {self.depth} steps; cannot run {depth}")
        if not is_concrete(program):
            return
        want = attention_steps(program, self.depth)
        if want != self.steps:
            raise ProgramError(
                f"the cache has slots for attention steps {list(self.steps)} "
                f"but the program's attention steps are {list(want)}: build "
                "the cache (prefill) with the same program"
            )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["cache", "slot", "write_B"],
    meta_fields=["prefill"],
)
@dataclasses.dataclass(frozen=True)
class StepCache:
    """What one attention call sees: the cache, its slot, and which rows really write.

    prefill=True: the T new tokens are the whole cache content so far (written at 0) and
    attend causally among themselves; prefill=False: T >= 1 new tokens per sequence,
    written at its indices length[b] .. length[b] + T - 1, each attending to the valid keys
    at indices up to its own (one token per step when decoding; T = draft tokens + 1 when
    verifying a draft).
    """

    cache: KVCache
    slot: jax.Array  # int32 []
    write_B: jax.Array  # bool [B]: False marks the written keys invalid (exited tokens)
    prefill: bool

    def update(self, k_BTKD, v_BTKD, kv_mask_BT, causal: bool, *, window=None, positions_BT=None):
        """Write the new keys/values; returns (self', keys, values, key mask, causal,
        window) to attend with (the key mask is [B, S], or [B, T, S] per query when
        extending). `positions_BT` are the new tokens' positions, recorded in the cache;
        extending folds this row's `window` into the key mask by position."""
        c = self.cache
        B, T = k_BTKD.shape[:2]
        valid_BT = jnp.broadcast_to(self.write_B[:, None], (B, T))
        if kv_mask_BT is not None:
            valid_BT = valid_BT & kv_mask_BT.astype(bool)
        if self.prefill:
            write = lambda buf, new: jax.lax.dynamic_update_slice(
                buf, new[None].astype(buf.dtype), (self.slot, 0, 0) + (0,) * (buf.ndim - 3)
            )
            c = c.replace(
                k=write(c.k, k_BTKD), v=write(c.v, v_BTKD), valid=write(c.valid, valid_BT)
            )
            if positions_BT is not None:
                c = c.replace(positions=c.positions.at[:, :T].set(positions_BT))
            # the prompt sits at cache index 0: the window works on indices
            return dataclasses.replace(self, cache=c), k_BTKD, v_BTKD, kv_mask_BT, causal, window
        index_BT = c.length[:, None] + jnp.arange(T, dtype=c.length.dtype)
        rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        put = lambda buf, new: buf.at[self.slot, rows_BT, index_BT].set(
            new.astype(buf.dtype), mode="drop"
        )
        c = c.replace(k=put(c.k, k_BTKD), v=put(c.v, v_BTKD), valid=put(c.valid, valid_BT))
        if positions_BT is not None:
            c = c.replace(
                positions=c.positions.at[rows_BT, index_BT].set(
                    positions_BT.astype(jnp.int32), mode="drop"
                )
            )
        slot = lambda buf: jax.lax.dynamic_index_in_dim(buf, self.slot, keepdims=False)
        S = c.max_len
        sees_BTS = slot(c.valid)[:, None, :] & (
            jnp.arange(S)[None, None, :] <= index_BT[:, :, None]
        )
        if window is not None:
            sees_BTS = sees_BTS & (positions_BT[:, :, None] - c.positions[:, None, :] < window)
        return dataclasses.replace(self, cache=c), slot(c.k), slot(c.v), sees_BTS, False, None
