"""The seed methods of issue 27: layer-wise quantization (dj.depth.quantize) and TLEG linear
expansion (dj.depth.linear_expand), each against an independent reference (numpy, finite
differences, tests/reference.py). Stitching (dj.depth.stitch) is tests/test_stitch.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import depthjax as dj
import depthjax.depth as D
from depthjax.core import quant, rows as rows_lib
from depthjax.depth.quantization import row_importance
from depthjax.hf.config import HFError
from depthjax.metrics.scores import Scores
from tests import reference

TOL = dict(rtol=1e-5, atol=1e-5)
BITS = {0: 16, 1: 8, 2: 4, 3: 4}


# -- quantization ------------------------------------------------------------------------
def np_quantize(w, bits, n_in_dims, group_size):
    """numpy reference for one row's kernel w [*in, *out] at `bits`: (dequantized, scale
    per element) with groups of g consecutive inputs (g: the largest divisor <= group_size)."""
    shape = w.shape
    n_in = int(np.prod(shape[:n_in_dims]))
    g = max(d for d in range(1, group_size + 1) if n_in % d == 0)
    w2 = np.asarray(w, np.float64).reshape(n_in // g, g, -1)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w2).max(axis=1, keepdims=True) / qmax
    q = np.clip(np.round(w2 / np.where(scale > 0, scale, 1)), -qmax, qmax)
    scale_full = np.broadcast_to(scale, w2.shape)
    return (q * scale).reshape(shape), scale_full.reshape(shape)


@pytest.fixture(scope="module")
def quantized(llama):
    return D.quantize(llama, BITS, group_size=16)


def _in_dims(path):
    return 2 if path[-2:] == ("o", "kernel") else 1


def test_quantize_error_is_within_half_a_step_per_group(llama, quantized):
    plain = traverse_util.flatten_dict(llama.params["blocks"])
    deq = traverse_util.flatten_dict(rows_lib.floats(quantized.params["blocks"]))
    assert set(plain) == set(deq)
    for path, table in plain.items():
        for row, bits in BITS.items():
            w, got = np.asarray(table[row]), np.asarray(deq[path][row])
            if path[-1] != "kernel" or bits == 16:
                assert got.dtype == w.dtype and np.array_equal(got, w), path  # bit-identical
                continue
            want, scale = np_quantize(w, bits, _in_dims(path), 16)
            err = np.abs(got - w)
            assert (err <= scale / 2 * (1 + 1e-5) + 1e-12).all(), (path, row)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            # at most 2**bits - 1 distinct levels per group (symmetric integers)
            levels = np.round(got / np.where(scale > 0, scale, 1)).astype(np.int64)
            assert np.abs(levels).max() <= 2 ** (bits - 1) - 1


def test_storage_is_one_int8_table_with_a_side_table_for_16_bit_rows(llama, quantized):
    node = quantized.params["blocks"]["mlp"]["up"]["kernel"]
    n = llama.n_blocks
    assert node[quant.QINT].dtype == jnp.int8 and node[quant.QINT].shape == (n, 64, 176)
    assert node[quant.QSCALE].shape == (n, 4, 176)  # 64 inputs in groups of 16
    assert node[quant.QFULL].shape == (1, 64, 176)  # only row 0 is at 16 bits
    assert np.asarray(node[quant.QSLOT]).tolist() == [0, -1, -1, -1]
    assert D.row_bits(quantized).tolist() == [16, 8, 4, 4]
    assert quantized.n_blocks == n
    before, after = D.table_bytes(llama), D.table_bytes(quantized)
    assert after < 0.6 * before
    assert D.table_bytes(quantized, packed=True) < after
    all8 = D.quantize(llama, 8)
    assert quant.QFULL not in all8.params["blocks"]["attn"]["q"]["kernel"]
    assert D.table_bytes(all8) < 0.3 * before


def test_apply_of_quantized_equals_reference_of_dequantized(llama, quantized, tokens):
    deq = D.dequantize(quantized)
    want = reference.forward(deq, tokens, reference.sequential(range(llama.depth)))
    np.testing.assert_allclose(dj.apply(quantized, tokens), want, **TOL)
    np.testing.assert_allclose(dj.apply(quantized, tokens, unroll=True), want, **TOL)
    looped = D.reorder(quantized, [0, 1, 1, 3, 2])  # rows of other widths, in any order
    groups = reference.sequential([0, 1, 1, 3, 2])
    np.testing.assert_allclose(
        dj.apply(looped, tokens), reference.forward(deq, tokens, groups), **TOL
    )
    np.testing.assert_allclose(dj.specialize(looped)(tokens), dj.apply(looped, tokens), **TOL)


def test_quantized_model_generates_like_its_dequantized_table(quantized, tokens):
    a = dj.generate(quantized, tokens[:, :4], 4, temperature=0)
    b = dj.generate(D.dequantize(quantized), tokens[:, :4], 4, temperature=0)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_quantized_checkpoint_round_trips(quantized, tokens, tmp_path):
    dj.save(quantized, tmp_path / "q")
    back = dj.load(tmp_path / "q")
    assert jax.tree.structure(back.params) == jax.tree.structure(quantized.params)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(quantized.params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(dj.apply(back, tokens), dj.apply(quantized, tokens))


def test_malformed_quantized_checkpoint_is_refused(quantized, tmp_path):
    blocks = traverse_util.flatten_dict(quantized.params["blocks"])
    blocks[("attn", "q", "kernel", quant.QSLOT)] = jnp.asarray([-1, -1, -1, -1], jnp.int32)
    bad = quantized.replace(
        params={**quantized.params, "blocks": traverse_util.unflatten_dict(blocks)}
    )
    dj.save(bad, tmp_path / "bad")
    with pytest.raises(dj.CheckpointError, match="qslot"):
        dj.load(tmp_path / "bad")


def test_hf_export_refuses_a_quantized_model_unless_dequantized(quantized, tmp_path):
    with pytest.raises(HFError, match="quantized.*dequantize=True"):
        dj.hf.save(quantized, str(tmp_path / "hf"))
    dj.hf.save(quantized, str(tmp_path / "hf2"), dequantize=True)
    back = dj.hf.load(str(tmp_path / "hf2"))
    want = D.dequantize(quantized)
    for a, b in zip(jax.tree.leaves(back.params["blocks"]), jax.tree.leaves(want.params["blocks"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bits_from_scores_keep_the_most_important_rows_widest(llama):
    scores = Scores("block_influence", "block", np.array([0.3, 0.1, 0.4, 0.2]))
    q = D.quantize(llama, scores, average=6)
    assert D.row_bits(q).tolist() == [8, 4, 8, 4]
    q = D.quantize(llama, scores, average=10, widths=(4, 8, 16))
    assert D.row_bits(q).tolist() == [16, 4, 16, 4] and D.row_bits(q).mean() <= 10
    tied = llama.with_program(dj.Program.create([0, 1, 0, 2], n_blocks=4))  # row 3 unused
    importance = row_importance(tied, scores)  # row 0 runs twice: 0.3 + 0.4
    np.testing.assert_allclose(importance, [0.7, 0.1, 0.2, -np.inf])
    assert D.allocate(importance, 5).tolist() == [8, 4, 4, 4]


def test_table_transforms_on_a_quantized_table(quantized, tokens):
    prog = dj.Program.create([2, 0, 2], n_blocks=4)
    model = quantized.with_program(prog)
    small = D.compact(model)  # keeps rows 0 and 2, still quantized
    assert small.n_blocks == 2 and D.row_bits(small).tolist() == [16, 4]
    np.testing.assert_allclose(dj.apply(small, tokens), dj.apply(model, tokens), **TOL)
    flat = D.materialize(model)  # one float row per step
    assert not quant.is_quantized(flat.params["blocks"])
    np.testing.assert_allclose(dj.apply(flat, tokens), dj.apply(model, tokens), **TOL)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: D.quantize(m, 3), "4, 8 or 16"),
        (lambda m: D.quantize(m, {7: 4}), "not rows"),
        (lambda m: D.quantize(m, [4, 8]), "bits must be"),
        (lambda m: D.quantize(m, 4, group_size=0), "group_size"),
        (lambda m: D.quantize(m, Scores("x", "block", np.ones(4))), "average="),
        (lambda m: D.quantize(m, Scores("x", "block", np.ones(4)), average=3), "below"),
        (lambda m: D.quantize(D.quantize(m, 8), 4), "already quantized"),
        (lambda m: D.grow(D.quantize(m, 8), 0), "dequantize it first"),
        (lambda m: D.fold(D.quantize(m, 8)), "dequantize it first"),
    ],
)
def test_quantize_refuses(llama, call, match):
    with pytest.raises(D.QuantizedError, match=match):
        call(llama)


# -- TLEG linear expansion ---------------------------------------------------------------
@pytest.fixture(scope="module")
def gene():
    """A 2-row learngene [theta_A, theta_B] with non-trivial norms (random scales)."""
    m = dj.init(dj.configs.get("llama-tiny", n_layers=2), jax.random.key(1))
    rng = np.random.default_rng(0)
    blocks = jax.tree.map(
        lambda t: t + 0.1 * rng.standard_normal(t.shape).astype(t.dtype), m.params["blocks"]
    )
    return m.replace(params={**m.params, "blocks": blocks})


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_linear_expansion_matches_the_formula_in_numpy(gene, depth, tokens):
    out = D.linear_expand(gene, depth)
    assert out.n_blocks == depth and out.depth == depth and out.config.n_layers == depth
    plain = traverse_util.flatten_dict(gene.params["blocks"])
    got = traverse_util.flatten_dict(out.params["blocks"])
    for path, t in plain.items():
        a, b = np.asarray(t[0], np.float64), np.asarray(t[1], np.float64)
        for pos in range(depth):
            want = a + (pos / (depth - 1) if depth > 1 else 0.0) * b
            np.testing.assert_allclose(np.asarray(got[path][pos]), want, rtol=1e-6, atol=1e-7)
    trained = D.linear_expand(gene, depth, train=True)
    assert D.is_expanded(trained) and not D.is_expanded(out)
    want = reference.forward(out, tokens, reference.sequential(range(depth)))
    np.testing.assert_allclose(dj.apply(trained, tokens), want, **TOL)
    np.testing.assert_array_equal(dj.apply(trained, tokens), dj.apply(out, tokens))


def test_learngene_round_trips_and_fits_a_line(gene):
    back = D.learngene(D.linear_expand(gene, 7, train=True))  # exact: the stored genes
    for a, b in zip(jax.tree.leaves(back.params["blocks"]), jax.tree.leaves(gene.params["blocks"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fitted = D.learngene(D.linear_expand(gene, 6))  # least squares through 6 collinear rows
    for a, b in zip(
        jax.tree.leaves(fitted.params["blocks"]), jax.tree.leaves(gene.params["blocks"])
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _loss(params, model, tokens, w):
    return jnp.sum(dj.apply(model.replace(params=params), tokens) * w)


def test_expansion_gradient_matches_finite_differences(gene, tokens):
    model = D.linear_expand(gene, 4, train=True)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 256)), jnp.float32) / 100
    params = model.params
    grads = jax.grad(_loss, allow_int=True)(params, model, tokens, w)
    # only the genes get gradients (positions are integers, not differentiated)
    up = grads["blocks"]["mlp"]["up"]["kernel"]
    assert up["lx_pos"].dtype == jax.dtypes.float0
    # the chain rule through the expansion: dA = sum_l dtheta_l, dB = sum_l l/(L-1) dtheta_l
    flat = D.linear_expand(gene, 4)
    g_rows = jax.grad(_loss)(flat.params, flat, tokens, w)["blocks"]["mlp"]["up"]["kernel"]
    c = np.arange(4) / 3
    np.testing.assert_allclose(up["lx_a"], np.asarray(g_rows).sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        up["lx_b"], np.tensordot(c, np.asarray(g_rows), axes=1), rtol=1e-4, atol=1e-6
    )
    # central finite differences along random directions of theta_A and theta_B
    rng = np.random.default_rng(2)
    for key in ("lx_a", "lx_b"):
        v = rng.standard_normal(up[key].shape).astype(np.float32)
        v /= np.linalg.norm(v)

        def moved(eps, key=key, v=v):
            p = jax.tree.map(lambda x: x, params)
            node = dict(p["blocks"]["mlp"]["up"]["kernel"])
            node[key] = node[key] + eps * v
            p["blocks"] = {**p["blocks"], "mlp": {**p["blocks"]["mlp"], "up": {"kernel": node}}}
            return float(_loss(p, model, tokens, w))

        eps = 1e-2
        fd = (moved(eps) - moved(-eps)) / (2 * eps)
        np.testing.assert_allclose(fd, float(np.sum(np.asarray(up[key]) * v)), rtol=2e-2, atol=1e-5)


def test_training_keeps_the_expansion_exact(gene, tokens, tmp_path):
    from depthjax.adaptive.training import fit
    from depthjax.core.loss import nll_sums

    model = D.linear_expand(gene, 3, train=True)

    def loss(p, t):
        s, n = nll_sums(dj.apply(model.replace(params=p), t), t, jnp.ones_like(t))
        return s / n, {}

    params, history = fit(loss, model.params, lambda i: (tokens,), steps=3, lr=1e-2, log=None)
    node = params["blocks"]["attn"]["q"]["kernel"]
    assert not np.array_equal(node["lx_a"], model.params["blocks"]["attn"]["q"]["kernel"]["lx_a"])
    assert np.asarray(node["lx_pos"]).tolist() == [0, 1, 2]  # integers are never trained
    trained = model.replace(params=params)
    rows = rows_lib.floats(trained.params["blocks"])["attn"]["q"]["kernel"]
    np.testing.assert_allclose(rows[1], node["lx_a"] + 0.5 * node["lx_b"], rtol=1e-6, atol=1e-7)
    dj.save(trained, tmp_path / "tleg")
    back = dj.load(tmp_path / "tleg")
    assert D.is_expanded(back)
    np.testing.assert_array_equal(dj.apply(back, tokens), dj.apply(trained, tokens))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: D.linear_expand(m, 4), "2-row table"),
        (lambda m: D.linear_expand(D.learngene(m), 0), "positive int"),
    ],
)
def test_linear_expand_refuses(llama, call, match):
    with pytest.raises(D.LearngeneError, match=match):
        call(llama)
