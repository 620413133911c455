"""Pure-JAX reference attention: the ground truth the Pallas kernels are tested against.

Materializes the full [B, H, T, S] score matrix in float32, so it is for tests and small
shapes only. Semantics shared with every kernel in this package:

* layout [B, T, H, D] for queries, [B, S, K, D] for keys/values, H a multiple of K
  (grouped-query: query head h reads key/value head h // (H // K));
* `causal`: query t sees keys s <= t (aligned at position 0); a `window` (causal only)
  further limits that to t - s < window;
* `softcap`: logits become softcap * tanh(logits / softcap) before masking;
* segment ids: query t sees key s only if q_segment_ids[b, t] == kv_segment_ids[b, s];
* a query row that can see no key at all returns zeros (not an average of V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_mask(
    T: int, S: int, *, causal: bool, q_segment_ids_BT=None, kv_segment_ids_BS=None, window=None
):
    """Boolean [B or 1, T, S]: True where query t may attend to key s."""
    mask = jnp.ones((1, T, S), bool)
    distance = jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
    if causal:
        mask = mask & (distance >= 0)[None]
    if window is not None:
        mask = mask & (distance < window)[None]
    if q_segment_ids_BT is not None:
        mask = mask & (q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :])
    return mask


def reference_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    causal: bool = False,
    segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    window=None,
    softcap: float | None = None,
):
    """Naive softmax attention in float32; returns [B, T, H, D] in q's dtype.

    `segment_ids` [B, T] applies to queries and, unless `kv_segment_ids` [B, S] is given,
    to keys as well.
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    scale = D**-0.5 if scale is None else scale
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    q = q_BTHD.astype(jnp.float32).reshape(B, T, K, G, D)
    k, v = k_BSKD.astype(jnp.float32), v_BSKD.astype(jnp.float32)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q, k, precision="highest") * scale
    if softcap is not None:
        s_BKGTS = softcap * jnp.tanh(s_BKGTS / softcap)
    mask_BTS = reference_mask(
        T,
        S,
        causal=causal,
        q_segment_ids_BT=segment_ids,
        kv_segment_ids_BS=kv_segment_ids,
        window=window,
    )
    mask = mask_BTS[:, None, None]
    s_BKGTS = jnp.where(mask, s_BKGTS, -jnp.inf)
    # Rows with no visible key: softmax of all -inf would be NaN; define them as zero output.
    any_key = jnp.any(mask, axis=-1, keepdims=True)
    p = jax.nn.softmax(jnp.where(any_key, s_BKGTS, 0.0), axis=-1)
    p = jnp.where(mask, p, 0.0)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, precision="highest")
    return o.reshape(B, T, H, D).astype(q_BTHD.dtype)
