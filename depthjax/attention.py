"""The one attention entry point. Models call `attend`; `impl` picks the implementation.

Masks are described, not materialized, by the caller (causal flag, segment ids for packed
documents, key padding), so that fused kernels can use them without a T x S mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("xla",)


def attention_mask(T: int, S: int, *, causal: bool, segment_ids_BT=None, kv_mask_BS=None,
                   q_offset=0):
    """Boolean mask [B or 1, 1, T, S]: True where query t may attend to key s.

    `q_offset` is the absolute position of query 0 among the keys (decoding with a cache).
    """
    mask = jnp.ones((1, 1, T, S), bool)
    if causal:
        q_pos = jnp.arange(T)[:, None] + q_offset
        mask = mask & (jnp.arange(S)[None, :] <= q_pos)[None, None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :])
    if kv_mask_BS is not None:
        mask = mask & kv_mask_BS.astype(bool)[:, None, None, :]
    return mask


def attend(q_BTHD, k_BSKD, v_BSKD, *, causal: bool, segment_ids_BT=None, kv_mask_BS=None,
           scale: float | None = None, impl: str = "xla"):
    """Softmax attention; H must be a multiple of K (grouped-query). Returns [B, T, H, D]."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not available; choose from {IMPLS}")
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    mask = attention_mask(T, S, causal=causal, segment_ids_BT=segment_ids_BT,
                          kv_mask_BS=kv_mask_BS)
    return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask, scale=scale,
                                        implementation="xla")
