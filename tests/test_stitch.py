"""Stitching (dj.depth.stitch, issue 27 part 3): a's first steps, a linear map, b's steps.

References: the model itself (a stitch of a model with itself through the identity map),
numpy least squares on residuals read from `dj.apply(trace=True)`, a naive composition
built from tests/reference.py, repeated full forwards for greedy decoding, the next-token
loss for perplexity and core.flops for the cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core import flops
from depthjax.core.loss import nll_sums
from depthjax.files import ModelDir
from tests import reference

TOL = dict(rtol=1e-5, atol=1e-5)
V = 256


@pytest.fixture(scope="module")
def a():
    return dj.init(dj.configs.get("llama-tiny", n_layers=3, d_model=32), jax.random.key(0))


@pytest.fixture(scope="module")
def b():
    cfg = dj.configs.get("llama-tiny", n_layers=4, d_model=48, n_heads=6, n_kv_heads=2)
    return dj.init(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(2), (2, 12), 0, V)


@pytest.fixture(scope="module")
def calibration():
    return [jax.random.randint(jax.random.key(10 + i), (4, 32), 0, V) for i in range(2)]


@pytest.fixture(scope="module")
def mapped(a, b):
    """a 32 -> b 48 at at=2 (resume 3 by relative depth) through a random map."""
    W = jax.random.normal(jax.random.key(3), (32, 48)) / np.sqrt(32)
    c = 0.1 * jax.random.normal(jax.random.key(4), (48,))
    return dj.depth.stitch(a, b, at=2, map=(W, c))


apply = jax.jit(dj.apply)
traced = jax.jit(lambda m, t: dj.apply(m, t, trace=True))


@pytest.mark.parametrize("at", [1, 2])
def test_a_model_stitched_to_itself_through_the_identity_is_the_model(a, tokens, at):
    s = dj.depth.stitch(a, a, at=at, resume=at)  # one width: the identity map by default
    assert s.depth == a.depth and (s.at, s.resume) == (at, at)
    np.testing.assert_array_equal(np.asarray(s.W), np.eye(32))
    np.testing.assert_allclose(apply(s, tokens), apply(a, tokens), **TOL)
    # the cost: a's forward plus the map's 2 D^2
    want = flops.forward_flops_per_token(a.config, 12, a.program) + 2 * 32 * 32
    assert s.flops_per_token(12) == want


def test_least_squares_of_a_model_with_itself_is_the_identity(a, calibration):
    W, c = dj.depth.fit_map(a, a, 2, 2, calibration)
    np.testing.assert_allclose(W, np.eye(32), atol=1e-3)
    np.testing.assert_allclose(c, np.zeros(32), atol=1e-3)


def test_least_squares_matches_numpy_on_traced_residuals(a, b, calibration):
    """W, c against float64 numpy lstsq of [x, 1] -> y, with x, y read from dj.apply's
    traces (residual[at] of a, residual[resume] of b: another path to the same
    activations); resume=0 is b's embedding."""
    for at, resume in ((2, 3), (1, 0)):
        W, c = dj.depth.fit_map(a, b, at, resume, calibration, ridge=0.0)
        t = jnp.concatenate(calibration)
        x = np.asarray(traced(a, t)[1].residual[at], np.float64).reshape(-1, 32)
        y = np.asarray(traced(b, t)[1].residual[resume], np.float64).reshape(-1, 48)
        sol = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
        np.testing.assert_allclose(W, sol[:-1], atol=2e-3)
        np.testing.assert_allclose(c, sol[-1], atol=2e-3)
        pred = x @ np.asarray(W, np.float64) + np.asarray(c, np.float64)
        resid = np.mean((pred - y) ** 2)
        best = np.mean((np.c_[x, np.ones(len(x))] @ sol - y) ** 2)
        assert resid <= best * (1 + 1e-3)


def test_padding_tokens_do_not_enter_the_fit(a, calibration):
    """Masked tokens are no samples: garbage behind a zero mask leaves the map unchanged."""
    t = np.asarray(calibration[0])
    mask = np.ones_like(t, np.float32)
    mask[:, 20:] = 0
    garbage = t.copy()
    garbage[:, 20:] = (t[:, 20:] + 7) % V
    W1, c1 = dj.depth.fit_map(a, a, 2, 1, [{"tokens": t, "mask": mask}])
    W2, c2 = dj.depth.fit_map(a, a, 2, 1, [{"tokens": garbage, "mask": mask}])
    np.testing.assert_allclose(W1, W2, atol=1e-5)
    np.testing.assert_allclose(c1, c2, atol=1e-5)


def naive_stitched(a, b, at, resume, W, c, tokens):
    """numpy: a's embedding and rows 0..at-1 (tests/reference.layer), h @ W + c, b's rows
    resume.. , b's final norm and head."""
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (B, T))
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
    x = np.asarray(a.params["embed"]["tok"]["embedding"])[tokens]
    for r in range(at):
        x = reference.layer(a.config, reference.row(a.params, r), x, pos, causal)
    x = np.asarray(x) @ np.asarray(W) + np.asarray(c)
    for r in range(resume, b.depth):
        x = reference.layer(b.config, reference.row(b.params, r), x, pos, causal)
    cfg, params = b.config, b.params
    x = reference._norm(params["head"]["norm"], x, cfg.norm_eps, cfg.norm)
    tok = params["embed"]["tok"]["embedding"]
    return np.asarray(x) @ np.asarray(
        tok.T if cfg.tie_embeddings else params["head"]["out"]["kernel"]
    )


def test_logits_equal_a_naive_composition(a, b, mapped, tokens):
    assert (mapped.at, mapped.resume, mapped.depth) == (2, 3, 3)  # round(2 * 4 / 3) = 3
    want = naive_stitched(a, b, 2, 3, mapped.W, mapped.c, tokens)
    np.testing.assert_allclose(apply(mapped, tokens), want, rtol=1e-4, atol=1e-4)
    # the cost axis: a's 2 steps without its head, the map, b's last step and head
    fa = flops.sublayer_flops_per_token(a.config, 12)
    fb = flops.sublayer_flops_per_token(b.config, 12)
    want = 2 * (fa["attn"] + fa["mlp"]) + 2 * 32 * 48 + fb["attn"] + fb["mlp"] + fb["head"]
    assert mapped.flops_per_token(12) == pytest.approx(want)


def test_save_load_round_trip(mapped, tokens, tmp_path):
    dj.save(mapped, tmp_path / "s")
    back = dj.load(tmp_path / "s")
    assert isinstance(back, dj.depth.Stitched) and (back.at, back.resume) == (2, 3)
    for x, y in zip(jax.tree.leaves(mapped), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(apply(back, tokens), apply(mapped, tokens))
    with pytest.raises(dj.CheckpointError, match="stitched model"):
        ModelDir.read(tmp_path / "s")  # where one model is expected (every command)
    data = bytearray((tmp_path / "s" / "map.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "s" / "map.safetensors").write_bytes(bytes(data))
    with pytest.raises(dj.CheckpointError, match="map.safetensors does not match"):
        dj.load(tmp_path / "s")


def test_greedy_generation_equals_argmax_of_repeated_forwards(mapped):
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (2, 5), 0, V))
    gen = dj.generate(mapped, prompt, 5, temperature=0.0)
    # Full forwards over a fixed [2, 10] buffer (one compile): a causal model's logits at
    # t do not read the zeros after it.
    seq = np.zeros((2, 10), np.int32)
    seq[:, :5] = prompt
    for t in range(5, 10):
        seq[:, t] = np.argmax(np.asarray(apply(mapped, jnp.asarray(seq)))[:, t - 1], -1)
    np.testing.assert_array_equal(np.asarray(gen.tokens), seq[:, 5:])
    assert (np.asarray(gen.exit_steps) == mapped.depth).all()


def test_perplexity_is_the_next_token_loss(mapped):
    doc = "stitched models score like any model"
    ids = np.frombuffer(doc.encode(), np.uint8).astype(np.int32)[None]
    s, n = nll_sums(dj.apply(mapped, ids), ids)
    res = dj.eval.perplexity(mapped, [doc])
    assert res["nats_per_token"] == pytest.approx(float(s / n), rel=1e-5)


def test_fine_tuning_trains_only_the_map_and_lowers_the_loss(a, b, calibration):
    fitted = dj.depth.stitch(a, b, at=1, calibration=calibration)
    tuned = dj.depth.tune_map(fitted, calibration, 8, learning_rate=1e-2)
    for x, y in zip(jax.tree.leaves(fitted.parts), jax.tree.leaves(tuned.parts)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    t = jnp.concatenate(calibration)
    loss = lambda s: float(np.divide(*nll_sums(apply(s, t), t)))

    assert not np.allclose(fitted.W, tuned.W)
    assert loss(tuned) < loss(fitted)
