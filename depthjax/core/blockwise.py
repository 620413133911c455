"""Blockwise attention in plain jnp: an online softmax (flash-style) over key blocks inside
a map over query blocks, for the paths without a fused kernel (``xla``, and soft-capping).

Dense xla attention holds the whole score tensor, B * H * T * S floats (and its softmax),
so its memory grows with the square of the context. Here each block of bq = min(chunk, T)
queries walks the keys bk = min(chunk, S) at a time, keeping a running max, normaliser and
weighted sum in float32: the scores held at once are B * H * bq * bk. Key blocks that
no query of a block can see (above the causal diagonal, left of a sliding window) are
skipped with `lax.cond`.

Gradients: each query block and each key step is rematerialized (`jax.checkpoint`), so
the backward pass holds one query block's per-key-step carries (B * H * bq * Dh * S / bk
floats) instead of every score: XLA temp memory of llama-small's attention at 8k tokens,
forward / gradient, 13 / 27 MiB against 3.0 GiB dense (benchmarks/long_context.py).

Semantics are those of `attention.attend` on xla: query t sees key s when causal allows it
(s <= t, T and S aligned at 0), t - s < window, segment ids match and the key mask is set;
a query row that can see no key averages V uniformly over all S keys.

`use_blockwise(T, S, chunk)` is the documented switch (``ModelConfig.attention_chunk``):
blocks of `chunk` queries and keys when T * S > 4 * chunk ** 2 (more than four blocks),
the dense path otherwise. Why four: at 1024 tokens (2 x 2 blocks of 512) block influence of
llama-small ran 1.2-1.7x slower blockwise on CPU (4 runs) for the same peak memory, while
at 2048 tokens it ran 0.93-1.12x the time with 0.75-0.78x the peak (2 runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def use_blockwise(T: int, S: int, chunk: int) -> bool:
    """Whether attention over T queries and S keys runs blockwise: chunk > 0 and T * S >
    4 * chunk ** 2 (the dense scores would fill more than four chunk x chunk blocks)."""
    return chunk > 0 and T * S > 4 * chunk * chunk


def _pad(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(
    q_BTHD,
    k_BSKD,
    v_BSKD,
    *,
    causal: bool,
    segment_ids_BT=None,
    kv_mask_BS=None,
    scale: float | None = None,
    window=None,
    softcap: float | None = None,
    chunk: int = 512,
):
    """Softmax attention [B, T, H, Dh] in blocks of min(chunk, T) queries x min(chunk, S) keys.

    Same arguments as `attention.attend`: H a multiple of K (grouped-query); segment_ids_BT
    [B, T] (T == S); kv_mask_BS [B, S] or a per-query [B, T, S]; window an int (may be
    traced, causal only); softcap: scores -> softcap * tanh(scores / softcap)."""
    B, T, H, Dh = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    bq, bk = min(chunk, T), min(chunk, S)
    nq, nk = -(-T // bq), -(-S // bk)
    scale = Dh**-0.5 if scale is None else scale
    f32 = jnp.float32

    # Blocks along a leading axis: queries [nq, B, bq, K, G, Dh], keys [nk, B, bk, K, Dh].
    q = _pad(q_BTHD, 1, nq * bq).reshape(B, nq, bq, K, G, Dh).swapaxes(0, 1)
    k = _pad(k_BSKD, 1, nk * bk).reshape(B, nk, bk, K, Dh).swapaxes(0, 1)
    v = _pad(v_BSKD, 1, nk * bk).reshape(B, nk, bk, K, Dh).swapaxes(0, 1)
    # Keys past S are padding: never visible.
    key_ok = _pad(jnp.ones((B, S), bool), 1, nk * bk, False)
    if kv_mask_BS is not None and kv_mask_BS.ndim == 2:
        key_ok = key_ok & _pad(kv_mask_BS.astype(bool), 1, nk * bk, False)
    key_ok = key_ok.reshape(B, nk, bk).swapaxes(0, 1)  # [nk, B, bk]
    per_query = None
    if kv_mask_BS is not None and kv_mask_BS.ndim == 3:  # [B, T, S] -> [nq, nk, B, bq, bk]
        m = _pad(_pad(kv_mask_BS.astype(bool), 1, nq * bq, False), 2, nk * bk, False)
        per_query = m.reshape(B, nq, bq, nk, bk).transpose(1, 3, 0, 2, 4)
    seg_q = seg_k = None
    if segment_ids_BT is not None:
        seg_q = _pad(segment_ids_BT, 1, nq * bq).reshape(B, nq, bq).swapaxes(0, 1)
        seg_k = _pad(segment_ids_BT, 1, nk * bk).reshape(B, nk, bk).swapaxes(0, 1)
    # A row that sees no key: the uniform average of V over the S real keys [B, K, Dh].
    v_mean = jnp.mean(v_BSKD.astype(f32), axis=1)

    def key_step(qi, q_blk, seg_q_blk, carry, xs):
        kj, k_blk, v_blk, ok_blk, seg_k_blk, pq_blk = xs
        t = qi * bq + jnp.arange(bq)  # query positions [bq]
        s = kj * bk + jnp.arange(bk)  # key positions [bk]
        visible = None  # can any query of this block see any key of this key block?
        if causal:
            visible = kj * bk <= qi * bq + bq - 1
        if window is not None:
            in_window = qi * bq - (kj * bk + bk - 1) < window
            visible = in_window if visible is None else visible & in_window

        def update(carry):
            m_prev, l_prev, acc_prev, seen_prev = carry
            s_BKGQS = jnp.einsum(
                "bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=f32
            ) * jnp.asarray(scale, f32)
            if softcap is not None:
                s_BKGQS = softcap * jnp.tanh(s_BKGQS / softcap)
            mask = ok_blk[:, None, None, None, :]  # [B, 1, 1, 1, bk]
            if causal:
                mask = mask & (s[None, :] <= t[:, None])
            if window is not None:
                mask = mask & (t[:, None] - s[None, :] < window)
            if seg_q_blk is not None:
                mask = mask & (seg_q_blk[:, :, None] == seg_k_blk[:, None, :])[:, None, None]
            if pq_blk is not None:
                mask = mask & pq_blk[:, None, None]
            s_BKGQS = jnp.where(mask, s_BKGQS, -jnp.inf)
            # The running max only shifts exponents (it cancels in the ratio): no gradient.
            m_new = jnp.maximum(m_prev, jax.lax.stop_gradient(jnp.max(s_BKGQS, axis=-1)))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s_BKGQS - m_safe[..., None])
            corr = jnp.exp(m_prev - m_safe)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=f32
            )
            acc = acc_prev * corr[..., None] + pv
            l_new = l_prev * corr + jnp.sum(p, axis=-1)
            seen = seen_prev | jnp.any(mask, axis=-1)
            return m_new, l_new, acc, seen

        if visible is None:
            return update(carry), None
        return jax.lax.cond(visible, update, lambda c: c, carry), None

    def query_block(xs):
        qi, q_blk, seg_q_blk, pq_rows = xs
        carry = (
            jnp.full((B, K, G, bq), -jnp.inf, f32),
            jnp.zeros((B, K, G, bq), f32),
            jnp.zeros((B, K, G, bq, Dh), f32),
            jnp.zeros((B, 1, 1, bq), bool),  # the mask has no head axes
        )
        step = jax.checkpoint(lambda c, x: key_step(qi, q_blk, seg_q_blk, c, x))
        (_, norm, acc, seen), _ = jax.lax.scan(
            step, carry, (jnp.arange(nk), k, v, key_ok, seg_k, pq_rows)
        )
        seen = jnp.broadcast_to(seen, norm.shape)
        out = acc / jnp.where(seen, norm, 1.0)[..., None]
        out = jnp.where(seen[..., None], out, v_mean[:, :, None, None, :])
        return out.transpose(0, 3, 1, 2, 4)  # [B, bq, K, G, Dh]

    out = jax.lax.map(jax.checkpoint(query_block), (jnp.arange(nq), q, seg_q, per_query))
    out = out.swapaxes(0, 1).reshape(B, nq * bq, H, Dh)[:, :T]
    return out.astype(q_BTHD.dtype)
