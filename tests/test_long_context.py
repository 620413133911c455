"""Memory-lean long context: blockwise attention (depthjax.core.blockwise) against the naive
reference attention (tests/reference.py), values and gradients, with a tiny block size
forced; models with blockwise attention against the naive reference forward; and trace /
coalition metrics computed a few rows at a time against the whole batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.attention import attend
from depthjax.core.blockwise import use_blockwise
from depthjax.metrics.scores import MetricError
from tests import reference

B, T, H, K, D = 2, 13, 4, 2, 8  # T not a multiple of the block: padded blocks are exercised
CHUNK = 4


def _qkv(S=T, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, S, K, D)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, S, K, D)), jnp.float32)
    return q, k, v


def _allowed(S, *, causal, window=None, segments=None, kv_mask=None):
    """The mask [B, T, S] spelled out in numpy."""
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    ok = np.ones((B, T, S), bool)
    if causal:
        ok &= s <= t
    if window is not None:
        ok &= t - s < window
    if segments is not None:
        ok &= segments[:, :, None] == segments[:, None, :]
    if kv_mask is not None:
        ok &= kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask
    return ok


_SEG = np.array([[0] * 5 + [1] * 8, [0] * 9 + [1] * 4])
_LEFT_PAD = np.arange(T)[None, :] >= np.array([[3], [0]])  # row 0's first queries see nothing
_R = np.random.default_rng(1)
_PER_QUERY = _R.random((B, T, 19)) < 0.3
_PER_QUERY[0, 2] = False  # a query row with no visible key
CASES = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "padding": dict(causal=True, kv_mask=_LEFT_PAD),
    "segments": dict(causal=True, segments=_SEG, kv_mask=_LEFT_PAD),
    "window": dict(causal=True, window=5),
    "softcap": dict(causal=True, softcap=1.5, kv_mask=_LEFT_PAD),
    "kv_mask_per_query": dict(causal=False, kv_mask=_PER_QUERY),  # decoding from a cache
}


def _attend_kwargs(case):
    kw = {"causal": case["causal"], "softcap": case.get("softcap")}
    if "window" in case:
        kw["window"] = jnp.int32(case["window"])  # traced, as each table row's is
    if "segments" in case:
        kw["segment_ids_BT"] = jnp.asarray(case["segments"])
    if "kv_mask" in case:
        kw["kv_mask_BS"] = jnp.asarray(case["kv_mask"])
    return kw


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_attention_equals_reference(name):
    case = CASES[name]
    S = case["kv_mask"].shape[-1] if "kv_mask" in case else T
    q, k, v = _qkv(S)
    allowed = _allowed(
        S,
        causal=case["causal"],
        window=case.get("window"),
        segments=case.get("segments"),
        kv_mask=case.get("kv_mask"),
    )
    kw = _attend_kwargs(case)
    assert use_blockwise(T, S, CHUNK)
    fn = lambda q, k, v: attend(q, k, v, chunk=CHUNK, **kw)
    ref = lambda q, k, v: reference.attend(q, k, v, allowed, D**-0.5, case.get("softcap"))

    def value_and_grads(f):  # grads of a nonlinear function of the output (training runs this)
        loss = lambda q, k, v: (lambda o: (jnp.sum(jnp.sin(o) * jnp.arange(D)), o))(f(q, k, v))
        return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    (got_grads, got), (want_grads, want) = value_and_grads(fn), value_and_grads(ref)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=0)


def test_rows_that_see_no_key_average_values_uniformly():
    q, k, v = _qkv(19)
    out = attend(q, k, v, causal=False, kv_mask_BS=jnp.asarray(_PER_QUERY), chunk=CHUNK)
    want = np.repeat(np.asarray(v[0]).mean(0), H // K, axis=0)  # [H, D]
    np.testing.assert_allclose(out[0, 2], want, atol=1e-6)


def test_blockwise_threshold():
    assert not use_blockwise(1024, 1024, 512) and use_blockwise(1025, 1024, 512)
    assert not use_blockwise(10**6, 10**6, 0)  # 0: always dense
    assert use_blockwise(1, 4 * 600 * 600 + 1, 600)  # one query over a long cache: key blocks


@pytest.mark.parametrize(
    "name", [pytest.param("llama-tiny", marks=pytest.mark.slow), "gemma2-tiny"]
)
def test_model_with_blockwise_attention_equals_reference(name):
    """gemma2-tiny: soft-capped logits and sliding-window rows; scan == unrolled too."""
    cfg = dataclasses.replace(dj.configs.get(name), attention_chunk=CHUNK)
    model = dj.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    mask = _LEFT_PAD.astype(np.float32)
    got = jax.jit(lambda m, t, x: dj.apply(m, t, mask=x))(model, tokens, mask)
    unrolled = jax.jit(lambda m, t, x: dj.apply(m, t, mask=x, unroll=True))(model, tokens, mask)
    groups = reference.sequential(range(cfg.n_layers))
    want = jax.jit(lambda m, t: reference.forward(m, t, groups, mask=mask))(model, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(unrolled, got, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def models():
    cfg = dj.configs.get("llama-tiny")
    dense = dj.init(cfg.replace(attention_chunk=0), jax.random.key(1))
    return dense, dense.replace(config=cfg.replace(attention_chunk=CHUNK))


def _batches():
    """Two batches of 4 rows (one shape: one compile per path), padded on either side."""
    r = np.random.default_rng(2)
    mask = np.ones((4, T), np.float32)
    mask[1, 9:] = 0  # right padding
    mask[3, :4] = 0  # left padding
    return [
        {"tokens": r.integers(0, 256, (4, T)), "mask": mask},
        r.integers(0, 256, (4, T)),
    ]


def test_trace_metrics_in_row_chunks_equal_the_whole_batch(models):
    dense, blockwise = models
    want = dj.metrics.trace_statistics(dense, _batches())
    got = dj.metrics.trace_statistics(blockwise, _batches(), chunk=2)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=2e-6, rtol=1e-5, err_msg=key)
    bi = dj.metrics.block_influence(blockwise, _batches(), chunk=2)
    np.testing.assert_allclose(bi, want["block_influence"], atol=2e-6, rtol=1e-5)
    with pytest.raises(MetricError, match="chunk"):
        dj.metrics.block_influence(dense, _batches(), chunk=0)


@pytest.mark.parametrize("strategy", ["prefix", "batched"])
def test_coalitions_in_row_chunks_equal_the_whole_batch(models, strategy):
    dense, blockwise = models
    keep = np.vstack([np.ones((1, 4)), 1 - np.eye(4)])
    want = dj.metrics.coalition_measures(dense, _batches(), "block", keep, strategy=strategy)
    got = dj.metrics.coalition_measures(
        blockwise, _batches(), "block", keep, strategy=strategy, chunk=2
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
