"""KV caches whose entries belong to the tokens that really ran a step.

`depthjax.inference.kv_cache` writes every token of the batch at one shared index. Adaptive depth
needs per-row bookkeeping instead: a routed step appends only the tokens routed through
it (so its cache holds exactly their entries), and a looped span keeps one entry per
token per loop it ran. Each class below is what one attention call sees; it implements
the `update(k, v, kv_mask, causal, *, window, positions_BT)` protocol that
`depthjax.core.layers.Attention` calls with its new keys and values, so blocks run unchanged
(through `model.program_step`). Sliding windows (depthjax.core.kinds) are honoured where keys
sit at their tokens' own indices (`LatestView`) and refused where a cache holds routed or
looped entries (their indices are not positions).

* `RowView`    one step, [B, S, K, Dh]: row b appends at its own `count[b]`;
* `LatestView` a looped step over a whole sequence, with per-token exits: a token that has
  stopped looping shows the keys of the last loop it ran (optionally recording every loop's
  keys into a `LoopView` layout for decoding);
* `LoopView`   a looped step while decoding, [B, S, J, K, Dh]: row b at loop j reads, for
  each earlier token s, the entry of loop min(j, loops run by s): the same keys
  `LatestView` shows, so decoding equals the full forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


def _rows(B: int):
    return jnp.arange(B)[:, None]


def _no_window(window, view: str) -> None:
    if window is not None:
        raise ValueError(
            f"{view}: adaptive depth does not support sliding-window rows (layer_types "
            "'L'); its cache entries are not indexed by position"
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "count", "write"],
    meta_fields=["prefill"],
)
@dataclasses.dataclass(frozen=True)
class RowView:
    """One step's cache, k/v [B, S, K, Dh], `count[b]` entries of row b filled.

    prefill=True: the T new tokens are the row's first entries (slots 0..T-1; the caller
    sets count to the number of real ones) and attend causally among themselves under the
    caller's key mask. prefill=False: one token per row, appended at count[b] where
    write[b] (rows with write False add nothing and see only their old entries).
    """

    k: jax.Array
    v: jax.Array
    count: jax.Array  # int32 [B]
    write: jax.Array  # bool [B]
    prefill: bool = False

    def update(self, k_BTKD, v_BTKD, kv_mask_BT, causal: bool, *, window=None, positions_BT=None):
        _no_window(window, "RowView")
        T = k_BTKD.shape[1]
        if self.prefill:
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
                buf, new.astype(buf.dtype), 0, axis=1
            )
            new = dataclasses.replace(self, k=put(self.k, k_BTKD), v=put(self.v, v_BTKD))
            return new, k_BTKD, v_BTKD, kv_mask_BT, causal, None
        if T != 1:
            raise ValueError(f"decoding appends one token per row, got {T}")
        B, S = self.k.shape[:2]
        at = jnp.where(self.write, self.count, S)[:, None]  # S: out of range, dropped
        put = lambda buf, new: buf.at[_rows(B), at].set(new.astype(buf.dtype), mode="drop")
        new = dataclasses.replace(self, k=put(self.k, k_BTKD), v=put(self.v, v_BTKD))
        valid_BS = jnp.arange(S)[None] < (self.count + self.write)[:, None]
        return new, new.k, new.v, valid_BS, False, None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "active", "record_k", "record_v", "slot"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LatestView:
    """A looped step run on a whole sequence in which some tokens stopped looping.

    k/v [B, T, K, Dh]: each token's keys from the last loop it ran. Active tokens replace
    theirs with this loop's; stopped ones keep the old. With record_k/v [B, S, J, K, Dh]
    (a decoding cache), this loop's keys of active tokens are also written at loop `slot`.
    """

    k: jax.Array
    v: jax.Array
    active: jax.Array  # bool [B, T]
    record_k: jax.Array | None = None
    record_v: jax.Array | None = None
    slot: jax.Array | None = None  # int32 []

    def update(self, k_BTKD, v_BTKD, kv_mask_BT, causal: bool, *, window=None, positions_BT=None):
        keep = self.active[:, :, None, None]
        k = jnp.where(keep, k_BTKD.astype(self.k.dtype), self.k)
        v = jnp.where(keep, v_BTKD.astype(self.v.dtype), self.v)
        new = dataclasses.replace(self, k=k, v=v)
        if self.record_k is not None:
            T = k_BTKD.shape[1]
            put = lambda buf, x: buf.at[:, :T, self.slot].set(
                jnp.where(keep, x.astype(buf.dtype), buf[:, :T, self.slot])
            )
            new = dataclasses.replace(
                new, record_k=put(self.record_k, k_BTKD), record_v=put(self.record_v, v_BTKD)
            )
        return new, k, v, kv_mask_BT, causal, window  # keys at their own indices


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "pos", "loop", "loops_run", "write"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class LoopView:
    """A looped step while decoding: k/v [B, S, J, K, Dh], one entry per token per loop.

    Row b's current token sits at pos[b] and runs loop slot loop[b] (0-based);
    loops_run [B, S] holds how many loops each earlier token ran (J for the current one).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array  # int32 [B]
    loop: jax.Array  # int32 [B]
    loops_run: jax.Array  # int32 [B, S]
    write: jax.Array  # bool [B]

    def update(self, k_BTKD, v_BTKD, kv_mask_BT, causal: bool, *, window=None, positions_BT=None):
        _no_window(window, "LoopView")
        B, S = self.k.shape[:2]
        at = jnp.where(self.write, self.pos, S)[:, None]
        put = lambda buf, x: buf.at[_rows(B), at, self.loop[:, None]].set(
            x.astype(buf.dtype), mode="drop"
        )
        k, v = put(self.k, k_BTKD), put(self.v, v_BTKD)
        slot_BS = jnp.minimum(self.loop[:, None], self.loops_run - 1)
        read = lambda buf: jnp.take_along_axis(buf, slot_BS[:, :, None, None, None], axis=2)[
            :, :, 0
        ]
        valid_BS = jnp.arange(S)[None] < (self.pos + self.write)[:, None]
        return dataclasses.replace(self, k=k, v=v), read(k), read(v), valid_BS, False, None
