"""Pallas attention kernels in interpret mode vs the naive float32 reference.

Sizes are tiny (the Pallas interpreter is slow) but blocks are smaller still, so every
case crosses several query and key blocks, the causal diagonal and padded tails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthjax.kernels import flash_attention, reference_attention, splash_attention

BLOCKS = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _inputs(B, T, S, H, K, D, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), dtype)
    k = jax.random.normal(kk, (B, S, K, D), dtype)
    v = jax.random.normal(kv, (B, S, K, D), dtype)
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32)
    return q, k, v, do


def _segments(B, T, seed=1):
    """Packed documents: increasing ids with a boundary roughly every 10 tokens."""
    starts = jax.random.bernoulli(jax.random.key(seed), 0.1, (B, T)).astype(jnp.int32)
    return jnp.cumsum(starts, axis=1)


def _value_and_grads(fn, q, k, v, do):
    """Output and d(sum(out * do))/d(q, k, v), jitted together."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * do), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)


CASES = [  # B, T, H, K, D, causal, segments
    pytest.param(1, 32, 2, 2, 16, False, False, id="mha"),
    pytest.param(1, 48, 4, 4, 16, True, False, id="causal"),
    pytest.param(2, 40, 4, 2, 16, True, False, id="causal-gqa-odd"),
    pytest.param(1, 37, 6, 2, 8, False, True, id="gqa3-segments-odd"),
    pytest.param(2, 45, 4, 1, 16, True, True, id="causal-mqa-segments-odd"),
]


@pytest.mark.parametrize("B,T,H,K,D,causal,segments", CASES)
def test_flash_matches_reference(B, T, H, K, D, causal, segments):
    q, k, v, do = _inputs(B, T, T, H, K, D)
    seg = _segments(B, T) if segments else None
    kw = dict(causal=causal, segment_ids=seg)
    out, grads = _value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, interpret=True, **kw, **BLOCKS), q, k, v, do
    )
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do
    )
    _assert_close(out, ref_out, 1e-5)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape, name
        _assert_close(g, rg, 1e-4)


def test_flash_cross_attention_key_padding_and_scale():
    """T != S (non-causal), keys masked through kv_segment_ids, custom scale, empty rows."""
    B, T, S, H, K, D = 2, 20, 33, 4, 2, 16
    q, k, v, do = _inputs(B, T, S, H, K, D, seed=3)
    q_seg = jnp.zeros((B, T), jnp.int32).at[1, 5].set(7)  # query (1, 5) sees no key
    kv_seg = jnp.where(jnp.arange(S)[None] < jnp.array([[S], [21]]), 0, -1).astype(jnp.int32)
    kw = dict(segment_ids=q_seg, kv_segment_ids=kv_seg, scale=0.3)
    out, grads = _value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, interpret=True, **kw, **BLOCKS), q, k, v, do
    )
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do
    )
    assert float(jnp.abs(out[1, 5]).max()) == 0.0
    _assert_close(out, ref_out, 1e-5)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, 1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_flash_half_precision(dtype):
    """Half-precision inputs accumulate in float32: error is input rounding, not drift."""
    q, k, v, do = _inputs(1, 64, 64, 2, 2, 32, dtype=dtype)
    kw = dict(causal=True)
    out, grads = _value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, interpret=True, **kw, **BLOCKS), q, k, v, do
    )
    up = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: reference_attention(up(q), up(k), up(v), **kw), q, k, v, do
    )
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = 2e-2 if dtype == jnp.bfloat16 else 4e-3
    _assert_close(out, ref_out, tol)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, 4 * tol)


def _pallas_calls(jaxpr):
    """Every pallas_call equation, descending into custom_vjp / pjit sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
            continue
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)
            if hasattr(sub, "eqns"):
                yield from _pallas_calls(sub)


def test_gqa_does_not_repeat_kv():
    """The kernels receive K/V with K heads (index maps share them), never H heads."""
    q, k, v, _ = _inputs(1, 32, 32, 8, 2, 16)
    jaxpr = jax.make_jaxpr(
        jax.grad(
            lambda q, k, v: flash_attention(q, k, v, interpret=True, **BLOCKS).sum(), argnums=(1, 2)
        )
    )(q, k, v)
    calls = list(_pallas_calls(jaxpr.jaxpr))
    assert len(calls) >= 3  # forward, dq, dkv
    for call in calls:
        shapes = [tuple(x.aval.shape) for x in call.invars + call.outvars]
        assert (1, 32, 8, 16) not in shapes[1:3], "K/V were repeated to H heads"
        assert all(s[2] in (2, 8) for s in shapes if len(s) == 4)


def test_reference_matches_jax_dot_product_attention():
    """The reference itself, against an independent implementation (GQA, causal, segments)."""
    q, k, v, _ = _inputs(2, 24, 24, 4, 2, 8)
    seg = _segments(2, 24)
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    _assert_close(reference_attention(q, k, v, causal=True, segment_ids=seg), want, 1e-5)


def test_splash_wrapper_matches_reference():
    """TPU path (splash attention) in interpret mode: GQA, causal, segments, odd length."""
    q, k, v, do = _inputs(1, 100, 100, 4, 2, 32, seed=5)
    seg = _segments(1, 100)
    kw = dict(causal=True, segment_ids=seg)
    out, grads = _value_and_grads(
        lambda q, k, v: splash_attention(q, k, v, interpret=True, **kw), q, k, v, do
    )
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do
    )
    _assert_close(out, ref_out, 1e-5)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, 1e-4)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(k_heads=4), "multiple of key/value heads"),
        (dict(S=20, causal=True), "T == S"),
        (dict(block_q=24), "power of two"),
        (dict(dtype=jnp.int32), "not supported"),
        (dict(segment_shape=(1, 5)), "segment_ids must be"),
    ],
)
def test_bad_input_errors(change, message):
    H, K = 6, change.get("k_heads", 2)
    S = change.get("S", 16)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.zeros((1, 16, H, 8), dtype)
    k = v = jnp.zeros((1, S, K, 8), dtype)
    seg = jnp.zeros(change["segment_shape"], jnp.int32) if "segment_shape" in change else None
    with pytest.raises(ValueError, match=message):
        flash_attention(
            q,
            k,
            v,
            causal=change.get("causal", False),
            segment_ids=seg,
            block_q=change.get("block_q", 16),
            interpret=True,
        )


@pytest.mark.parametrize(
    "dtype,D,H,K,windowed",
    [
        (jnp.bfloat16, 128, 8, 2, False),
        (jnp.float32, 64, 6, 2, False),
        (jnp.bfloat16, 64, 4, 2, True),
    ],
)
def test_triton_lowering_for_h100(dtype, D, H, K, windowed):
    """Without a GPU: the forward and both backward kernels lower to Triton for an H100
    (also with a traced window operand, its dynamic loop bounds, and soft-capping).

    Catches what interpret mode cannot: ops or shapes the Triton backend rejects.
    """
    mesh_lib = pytest.importorskip("jax._src.mesh")
    if not hasattr(mesh_lib, "AbstractDevice") or not hasattr(jax.sharding, "use_abstract_mesh"):
        pytest.skip("this jax cannot describe an abstract GPU")
    device = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    q = jax.ShapeDtypeStruct((2, 300, H, D), dtype)
    kv = jax.ShapeDtypeStruct((2, 300, K, D), dtype)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    extra = dict(softcap=30.0) if windowed else {}
    grad = jax.grad(
        lambda q, k, v, s, w: (
            flash_attention(
                q, k, v, causal=True, segment_ids=s, window=w if windowed else None, **extra
            )
            .astype(jnp.float32)
            .sum()
        ),
        argnums=(0, 1, 2),
    )
    window = jax.ShapeDtypeStruct((), jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh):
        text = (
            jax.jit(grad)
            .trace(q, kv, kv, seg, window)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert text.count("triton") >= 3, "expected forward, dq and dkv Triton kernels"


WINDOW_CASES = [  # B, T, H, K, D, window, softcap, segments
    pytest.param(1, 48, 2, 2, 16, 5, None, False, id="window-smaller-than-block"),
    pytest.param(2, 45, 4, 2, 16, 20, None, True, id="window-gqa-segments-odd"),
    pytest.param(1, 40, 2, 1, 16, 2**31 - 1, 3.0, False, id="global-sentinel-softcap"),
    pytest.param(1, 33, 2, 2, 8, 17, 2.0, False, id="window-softcap-odd"),
]


@pytest.mark.parametrize("B,T,H,K,D,window,softcap,segments", WINDOW_CASES)
def test_flash_window_and_softcap_match_reference(B, T, H, K, D, window, softcap, segments):
    """The window is a traced operand (one compiled kernel for every window), soft-capping
    a static one; forward and all three gradients against the naive reference."""
    q, k, v, do = _inputs(B, T, T, H, K, D, seed=5)
    seg = _segments(B, T) if segments else None
    kw = dict(causal=True, segment_ids=seg, softcap=softcap)

    def value_and_grads(fn):
        def loss(q, k, v, w):
            out = fn(q, k, v, w)
            return jnp.sum(out.astype(jnp.float32) * do), out

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = grad(q, k, v, jnp.int32(window))
        return out, grads

    out, grads = value_and_grads(
        lambda q, k, v, w: flash_attention(q, k, v, window=w, interpret=True, **kw, **BLOCKS)
    )
    ref_out, ref_grads = value_and_grads(
        lambda q, k, v, w: reference_attention(q, k, v, window=w, **kw)
    )
    _assert_close(out, ref_out, 1e-5)
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, 1e-4)
