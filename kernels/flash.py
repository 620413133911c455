"""Fused (flash) attention in Pallas, forward and backward, layout [B, T, H, D].

Online softmax over key blocks, nothing of size T x S is ever materialized. The kernels are
written against the portable Pallas model (Triton backend on GPU; they also run anywhere
in interpret mode, which is how the tests check them on CPU). On TPU `flash_attention`
delegates to `kernels.splash` (see there for why).

Design:
* grouped-query attention: the K/V BlockSpec index map sends query head h to K/V head
  h // G, so K/V are never repeated; the dK/dV kernel runs once per K/V head and loops
  over that head's G query heads, so gradients are summed in registers, not in HBM;
* the softmax runs in base 2 (scale * log2(e) folded into one multiply); the forward saves
  the per-row log-sum-exp so the backward recomputes probabilities without a second max;
* backward (FlashAttention-2 style): delta = rowsum(dO * O) in plain JAX, then one kernel
  for dQ (grid over query blocks) and one for dK/dV (grid over key blocks);
* masks are never arrays of size T x S: causal is an index comparison, packed documents
  and padding are int32 segment ids per position; for causal attention only the blocks
  on the diagonal pay for the mask, blocks above it are skipped;
* a sliding window (query t sees keys s with t - s < window) is a runtime int32 operand,
  so one compiled kernel serves rows with different windows; key blocks entirely left of
  every query's window are skipped, the blocks it cuts are masked;
* logit soft-capping (cap * tanh(s / cap), Gemma 2) is applied in the forward and its
  derivative (1 - tanh^2) in both backward kernels;
* lengths that are not a multiple of the block size are padded; padded keys get a
  segment id no query has and padded queries one no key has.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
MASK_VALUE = -1e30  # finite, so fully masked rows never produce inf - inf
KV_PAD_SEGMENT = -(2**31)  # segment id of padded / masked-out keys
Q_PAD_SEGMENT = -(2**31) + 1  # segment id of padded queries (match no key)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialize on (hashable: a custom_vjp nondiff argument)."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    has_segments: bool
    windowed: bool  # a window operand is passed (its value is data)
    softcap: float | None
    interpret: bool
    num_warps: int
    num_stages: int


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with float32 accumulation (full precision for float32 inputs)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scores(st: _Static, q, k, q_start, k_start, q_seg, kv_seg, window, *, causal: bool):
    """Scaled base-2 logits of one tile [bq, bk] with the mask applied, the mask, and (with
    soft-capping) tanh of the capped logits, which the backward needs.

    The mask is None when nothing in the tile can be masked (no select is emitted).
    """
    bq, bk = q.shape[0], k.shape[0]
    raw = _dot(q, k, trans_b=True)
    tanh = None
    if st.softcap is None:
        s = raw * (st.scale * LOG2E)
    else:
        tanh = jnp.tanh(raw * (st.scale / st.softcap))
        s = tanh * (st.softcap * LOG2E)
    mask = None
    if causal:  # windowed tiles are always masked (see _loop_over_keys)
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = k_idx <= q_idx
        if st.windowed:
            mask = mask & (q_idx - k_idx < window)
    if st.has_segments:
        seg = q_seg[:, None] == kv_seg[None, :]
        mask = seg if mask is None else mask & seg
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    return s, mask, tanh


def _softcap_grad(st: _Static, ds, tanh):
    """d(capped logit)/d(raw logit) = 1 - tanh^2 (the raw logit's scale is applied later)."""
    return ds if tanh is None else ds * (1.0 - tanh * tanh)


def _loop_over_keys(st: _Static, i, bq, bk, n_kv, body, carry, window):
    """Run body(j, carry, causal=...) over the key blocks query block i can see.

    Causal: blocks entirely below the diagonal skip the mask, blocks above it are skipped.
    Windowed: blocks left of the first query's window are skipped too, the rest masked.
    """
    if not st.causal:
        return lax.fori_loop(0, n_kv, functools.partial(body, causal=False), carry)
    n_end = jnp.minimum(pl.cdiv((i + 1) * bq, bk), n_kv)
    if st.windowed:
        first = jnp.maximum(i * bq - window + 1, 0) // bk
        return lax.fori_loop(first, n_end, functools.partial(body, causal=True), carry)
    n_full = jnp.minimum((i * bq) // bk, n_kv)
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False), carry)
    return lax.fori_loop(n_full, n_end, functools.partial(body, causal=True), carry)


def _unpack(st: _Static, refs, n_out: int):
    """(q_seg_ref, kv_seg_ref, window, output refs) from a kernel's trailing refs."""
    refs = list(refs)
    window = refs.pop(0)[0] if st.windowed else None
    if st.has_segments:
        q_seg_ref, kv_seg_ref = refs[:2]
        refs = refs[2:]
    else:
        q_seg_ref = kv_seg_ref = None
    assert len(refs) == n_out
    return q_seg_ref, kv_seg_ref, window, refs


def _compiler_params(st: _Static):
    if st.interpret:
        return None
    # Always explicit on GPU: the default Pallas GPU backend changed between jax releases.
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static, n_kv: int):
    """One query block of one head. q_ref [BQ, D]; k_ref, v_ref [Sp, D] (this head's KV)."""
    qseg_ref, kvseg_ref, window, (o_ref, lse_ref) = _unpack(st, refs, 2)
    q_seg = qseg_ref[...] if st.has_segments else None
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q = q_ref[...]

    def body(j, carry, *, causal):
        m, l, acc = carry
        k_start = j * bk
        v = v_ref[pl.ds(k_start, bk), :]
        kv_seg = kvseg_ref[pl.ds(k_start, bk)] if st.has_segments else None
        s, mask, _ = _scores(
            st,
            q,
            k_ref[pl.ds(k_start, bk), :],
            i * bq,
            k_start,
            q_seg,
            kv_seg,
            window,
            causal=causal,
        )
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        if mask is not None:  # a row with nothing visible yet has m_new == MASK_VALUE
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    carry = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, q.shape[-1]), jnp.float32),
    )
    m, l, acc = _loop_over_keys(st, i, bq, bk, n_kv, body, carry, window)
    empty = l == 0.0  # no visible key: output zeros
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _extra_inputs(st: _Static, window, q_seg, kv_seg, q_block, kv_block, index):
    """BlockSpecs and arrays of the window and segment-id operands, in kernel order.

    `index(kind)` maps grid indices to the block of the query ("q") or key ("kv") ids."""
    specs, args = [], []
    if st.windowed:
        specs.append(pl.BlockSpec((1,), lambda *_: (0,)))
        args.append(window)
    if st.has_segments:
        specs += [
            pl.BlockSpec((None, q_block), index("q")),
            pl.BlockSpec((None, kv_block), index("kv")),
        ]
        args += [q_seg, kv_seg]
    return specs, args


def _fwd(st: _Static, q, k, v, q_seg, kv_seg, window):
    """q [B, Tp, H, D], k/v [B, Sp, K, D] -> o [B, Tp, H, D], lse2 [B, H, Tp] (base 2)."""
    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    n_q, n_kv = Tp // st.block_q, Sp // st.block_k
    in_specs = [
        pl.BlockSpec((None, st.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
    ]
    specs, extra = _extra_inputs(
        st,
        window,
        q_seg,
        kv_seg,
        st.block_q,
        Sp,
        lambda kind: (lambda b, h, i: (b, i)) if kind == "q" else (lambda b, h, i: (b, 0)),
    )
    in_specs += specs
    args = [q, k, v, *extra]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, n_kv=n_kv),
        grid=(B, H, n_q),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, st.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, st.block_q), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="depthjax_flash_fwd",
    )(*args)


# ---------------------------------------------------------------------------- backward
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static, n_kv: int):
    """dQ for one query block of one head; loops over key blocks up to the diagonal."""
    qseg_ref, kvseg_ref, window, (dq_ref,) = _unpack(st, refs, 1)
    q_seg = qseg_ref[...] if st.has_segments else None
    bq, bk = st.block_q_bwd, st.block_k_bwd
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq, *, causal):
        k_start = j * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        kv_seg = kvseg_ref[pl.ds(k_start, bk)] if st.has_segments else None
        s, _, tanh = _scores(st, q, k, i * bq, k_start, q_seg, kv_seg, window, causal=causal)
        p = jnp.exp2(s - lse[:, None])
        ds = _softcap_grad(st, p * (_dot(do, v, trans_b=True) - delta[:, None]), tanh)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _loop_over_keys(st, i, bq, bk, n_kv, body, jnp.zeros(q.shape, jnp.float32), window)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static, n_q: int, group: int
):
    """dK, dV for one key block of one K/V head, summed over its `group` query heads.

    q_ref, do_ref [Tp, G, D]; lse_ref, delta_ref [G, Tp]; k_ref, v_ref [BK, D].
    """
    qseg_ref, kvseg_ref, window, (dk_ref, dv_ref) = _unpack(st, refs, 2)
    kv_seg = kvseg_ref[...] if st.has_segments else None
    bq, bk = st.block_q_bwd, st.block_k_bwd
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry, *, g, causal):
        dk, dv = carry
        q_start = i * bq
        q = q_ref[pl.ds(q_start, bq), g, :]
        do = do_ref[pl.ds(q_start, bq), g, :]
        lse = lse_ref[g, pl.ds(q_start, bq)]
        delta = delta_ref[g, pl.ds(q_start, bq)]
        q_seg = qseg_ref[pl.ds(q_start, bq)] if st.has_segments else None
        s, _, tanh = _scores(st, q, k, q_start, j * bk, q_seg, kv_seg, window, causal=causal)
        p = jnp.exp2(s - lse[:, None])  # [BQ, BK]
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = _softcap_grad(st, p * (_dot(do, v, trans_b=True) - delta[:, None]), tanh)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if st.causal:
        i_start = jnp.minimum((j * bk) // bq, n_q)  # first block reaching the key
        i_full = jnp.clip(pl.cdiv((j + 1) * bk - 1, bq), i_start, n_q)  # first fully visible
        if st.windowed:  # up to the last query that still sees this block's last key
            i_end = jnp.clip(((j + 1) * bk - 1 + window - 1) // bq + 1, i_start, n_q)
    for g in range(group):  # static: G is small and indexes the head axis
        if st.windowed:
            carry = lax.fori_loop(i_start, i_end, functools.partial(body, g=g, causal=True), carry)
        elif st.causal:
            carry = lax.fori_loop(i_start, i_full, functools.partial(body, g=g, causal=True), carry)
            carry = lax.fori_loop(i_full, n_q, functools.partial(body, g=g, causal=False), carry)
        else:
            carry = lax.fori_loop(0, n_q, functools.partial(body, g=g, causal=False), carry)
    dk, dv = carry
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, window, o, lse = res
    B, Tp, H, D = q.shape
    Sp, K = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = st.block_q_bwd, st.block_k_bwd
    n_q, n_kv = Tp // bq, Sp // bk
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(compiler_params=_compiler_params(st), interpret=st.interpret)

    dq_specs = [
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
    ]
    specs, dq_extra = _extra_inputs(
        st,
        window,
        q_seg,
        kv_seg,
        bq,
        Sp,
        lambda kind: (lambda b, h, i: (b, i)) if kind == "q" else (lambda b, h, i: (b, 0)),
    )
    dq_specs += specs
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, n_kv=n_kv),
        grid=(B, H, n_q),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="depthjax_flash_bwd_dq",
        **common,
    )(q, k, v, do, lse, delta, *dq_extra)

    # Index maps over (b, kv head, key block); the G query heads of a K/V head are the
    # contiguous block [kh * G, (kh + 1) * G) of the head axis.
    dkv_specs = [
        pl.BlockSpec((None, Tp, G, D), lambda b, kh, j: (b, 0, kh, 0)),
        pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0)),
        pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0)),
        pl.BlockSpec((None, Tp, G, D), lambda b, kh, j: (b, 0, kh, 0)),
        pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0)),
        pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0)),
    ]
    specs, dkv_extra = _extra_inputs(
        st,
        window,
        q_seg,
        kv_seg,
        Tp,
        bk,
        lambda kind: (lambda b, kh, j: (b, 0)) if kind == "q" else (lambda b, kh, j: (b, j)),
    )
    dkv_specs += specs
    kv_out = pl.BlockSpec((None, bk, None, D), lambda b, kh, j: (b, j, kh, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, n_q=n_q, group=G),
        grid=(B, K, n_kv),
        in_specs=dkv_specs,
        out_specs=[kv_out, kv_out],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="depthjax_flash_bwd_dkv",
        **common,
    )(q, k, v, do, lse, delta, *dkv_extra)
    return dq, dk, dv


# ------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, q_seg, kv_seg, window):
    return _fwd(st, q, k, v, q_seg, kv_seg, window)[0]


def _flash_fwd(st, q, k, v, q_seg, kv_seg, window):
    o, lse = _fwd(st, q, k, v, q_seg, kv_seg, window)
    return o, (q, k, v, q_seg, kv_seg, window, o, lse)


def _flash_bwd(st, res, do):
    dq, dk, dv = _bwd(st, res, do)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------ public
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def check_inputs(q, k, v, segment_ids, kv_segment_ids) -> None:
    """Raise ValueError naming the problem for shapes/dtypes no attention kernel accepts."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got ndim {q.ndim}, {k.ndim}, {v.ndim}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if H % k.shape[2]:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype {q.dtype} is not supported (float32, bfloat16, float16)")
    if segment_ids is not None and segment_ids.shape != (B, T):
        raise ValueError(f"segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
    if kv_segment_ids is not None and kv_segment_ids.shape != (B, k.shape[1]):
        raise ValueError(
            f"kv_segment_ids must be [B, S] = {(B, k.shape[1])}, got {kv_segment_ids.shape}"
        )


def flash_attention(
    q,
    k,
    v,
    *,
    causal: bool = False,
    segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    window=None,
    softcap: float | None = None,
    interpret: bool = False,
    block_q: int = 128,
    block_k: int = 64,
    block_q_bwd: int = 64,
    block_k_bwd: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Fused attention. q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0. Returns [B, T, H, D].

    causal: query t sees keys s <= t. segment_ids [B, T]: packed documents; queries see only
    keys with the same id (`kv_segment_ids` [B, S] when keys differ from queries, e.g. key
    padding: give masked keys an id no query has). scale defaults to 1/sqrt(D).
    window: int, may be traced (causal only): query t sees keys s with t - s < window.
    softcap: logits become softcap * tanh(logits / softcap) before the softmax.
    Accumulation is float32 for every input dtype. Rows that see no key return zeros.
    Any T, S: lengths are padded to the block size internally and the padding masked.
    interpret=True runs the Pallas kernels in the Pallas interpreter (any backend, slow).
    Differentiable in q, k, v (custom VJP with its own backward kernels).
    """
    check_inputs(q, k, v, segment_ids, kv_segment_ids)
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids for the queries")
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    if causal and T != S:
        raise ValueError(f"causal attention needs T == S (got T={T}, S={S})")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    for name, value in (
        ("block_q", block_q),
        ("block_k", block_k),
        ("block_q_bwd", block_q_bwd),
        ("block_k_bwd", block_k_bwd),
    ):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} must be a positive power of two, got {value}")
    # Blocks (powers of two, >= 16 for the matmul units) never exceed the padded sequence.
    fit = lambda block, n: min(block, max(16, 1 << (n - 1).bit_length()))
    bq, bk = fit(block_q, T), fit(block_k, S)
    bq_bwd, bk_bwd = fit(block_q_bwd, T), fit(block_k_bwd, S)
    Tp = _round_up(T, math.lcm(bq, bq_bwd))
    Sp = _round_up(S, math.lcm(bk, bk_bwd))
    has_segments = segment_ids is not None or Tp != T or Sp != S
    q_seg = kv_seg = None
    if has_segments:
        q_seg = (
            jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        )
        kv_seg = q_seg if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, Tp - T)), constant_values=Q_PAD_SEGMENT)
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, Sp - S)), constant_values=KV_PAD_SEGMENT)
    if Tp != T:
        q = jnp.pad(q, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    if Sp != S:
        k = jnp.pad(k, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    # Untuned defaults (no GPU was available to tune on): wider tiles want more warps.
    num_warps = num_warps or (8 if D >= 128 else 4)
    if window is not None:  # >= T is global; clamping keeps the index arithmetic in int32
        window = jnp.clip(jnp.asarray(window, jnp.int32), 1, T).reshape(1)
    st = _Static(
        causal=causal,
        scale=scale,
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        has_segments=has_segments,
        windowed=window is not None,
        softcap=None if softcap is None else float(softcap),
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages or 2,
    )
    return _flash(st, q, k, v, q_seg, kv_seg, window)[:, :T]
