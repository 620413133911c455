"""TPU path: a thin wrapper over JAX's bundled splash attention (Mosaic TPU).

Why a wrapper rather than our own Mosaic TPU kernel: splash is maintained with the TPU
compiler, already skips fully masked blocks from a precomputed block-sparsity table,
supports segment ids and grouped-query attention (MQA kernel per K/V head), and ships its
own forward and backward. A second TPU kernel would duplicate it without hardware here to
tune it. What this module adds is depthjax's calling convention: layout [B, T, H, D],
GQA without repeating K/V, a softmax scale, any length (padded and masked), and the
same segment-id semantics as `kernels.flash.flash_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .flash import KV_PAD_SEGMENT, Q_PAD_SEGMENT, _round_up, check_inputs


@functools.lru_cache(maxsize=64)
def _kernel(T: int, S: int, G: int, causal: bool, block: int, softcap, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    head_mask = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mqa(
        sa.MultiHeadMask([head_mask] * G),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        attn_logits_soft_cap=softcap,
        interpret=interpret,
    )


def splash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    softcap: float | None = None,
    interpret: bool = False,
    block: int = 128,
):
    """Same contract as `flash_attention` (q [B, T, H, D], k/v [B, S, K, D]) on splash,
    without a sliding window (splash takes windows as static masks only).

    Rows that can see no key at all are undefined here (zeros in `flash_attention`); the
    wrapper only creates such rows for padding, which it slices off.
    """
    check_inputs(q, k, v, segment_ids, kv_segment_ids)
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    if causal and T != S:
        raise ValueError(f"causal attention needs T == S (got T={T}, S={S})")
    scale = D**-0.5 if scale is None else float(scale)
    Tp, Sp = _round_up(T, block), _round_up(S, block)
    q_seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_seg = q_seg if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, Tp - T)), constant_values=Q_PAD_SEGMENT)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Sp - S)), constant_values=KV_PAD_SEGMENT)
    use_segments = segment_ids is not None or Tp != T or Sp != S
    # [B, T, H, D] -> [B, K, G, Tp, D]: one MQA problem (G query heads, one K/V head) per K.
    q_BKGTD = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    q_BKGTD = jnp.pad(q_BKGTD, ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
    pad_kv = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    k_BKSD, v_BKSD = pad_kv(k), pad_kv(v)
    kernel = _kernel(
        Tp, Sp, G, causal, block, None if softcap is None else float(softcap), interpret
    )

    def one(q_GTD, k_SD, v_SD, qs, ks):
        seg = sa.SegmentIds(q=qs, kv=ks) if use_segments else None
        return kernel(q_GTD, k_SD, v_SD, segment_ids=seg)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over K/V heads
    o_BKGTD = jax.vmap(per_head)(q_BKGTD, k_BKSD, v_BKSD, q_seg, kv_seg)  # over batch
    return o_BKGTD[:, :, :, :T].transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
