"""Recurrent depth against independent references: the static looped program
(dj.depth.repeat), a hand-written truncated-backprop gradient, the extremes of the
convergence rule, future-token perturbations, and generation (depth-wise batched ==
lockstep == one row at a time == the full adaptive forward of the generated text)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.adaptive import AdaptiveError, recurrent as R, recurrent_decode as RD
from depthjax.core.walk import run_blocks

SPAN = (1, 3)  # steps 1..2 are the looped core of the 4-step llama-tiny


@pytest.fixture(scope="module")
def looped(llama):
    model, rec = R.attach(llama, *SPAN)
    return model, rec


def _tokens(B=2, T=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, T)).astype(np.int32)


def test_fixed_loop_count_equals_the_repeat_program(looped):
    model, rec = looped
    tokens = _tokens()
    for n in (1, 3):  # a traced count, truncated backprop longer and shorter than n
        want = dj.apply(dj.depth.repeat(model, list(range(*SPAN)), n), tokens)
        got = R.apply(model, rec, tokens, jnp.int32(n), backprop=2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(R.apply(model, rec, tokens, 3), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        R.static_program(model, rec, 3).program.block, [0, 1, 2, 1, 2, 1, 2, 3]
    )


@pytest.mark.slow
def test_fresh_injection_keeps_the_static_program(llama):
    model, rec = R.attach(llama, *SPAN, inject=True)
    tokens = _tokens()
    want = dj.apply(dj.depth.repeat(llama, list(range(*SPAN)), 3), tokens)
    np.testing.assert_allclose(
        R.apply(model, rec, tokens, jnp.int32(3), backprop=2), want, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_truncated_backprop_gradient_equals_hand_written_reference(looped):
    """Reference: the loops unrolled in Python with run_blocks, the state stop-gradiented
    after the first n - k loops."""
    model, rec = looped
    tokens = _tokens(B=1, T=8)
    n, k = 4, 2
    cfg = model.config
    prog = lambda lo, hi: jax.tree.map(lambda a: a[lo:hi], model.program)

    def reference_loss(params):
        x = params["embed"]["tok"]["embedding"][tokens]
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x, _ = run_blocks(cfg, params["blocks"], prog(0, 1), x, pos)
        for i in range(n):
            if i == n - k:
                x = jax.lax.stop_gradient(x)
            x, _ = run_blocks(cfg, params["blocks"], prog(1, 3), x, pos)
        x, _ = run_blocks(cfg, params["blocks"], prog(3, 4), x, pos)
        logits = dj.core.model.output_head(cfg, params, x)
        return jnp.mean(
            jax.nn.logsumexp(logits[:, :-1], -1)
            - jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        )

    got = jax.grad(
        lambda p: R.loss(model.replace(params=p), rec, tokens, jnp.int32(n), backprop=k)[0]
    )(model.params)
    want = jax.grad(reference_loss)(model.params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got["embed"]["tok"]["embedding"]).max()) == 0  # cut by truncation


TOL, MAX = 0.3, 6  # on the random llama-tiny these give loop counts 4..6 that vary by token


def test_adaptive_extremes_are_fixed_loop_counts(looped):
    model, rec = looped
    tokens = _tokens()
    logits, loops = R.apply_adaptive(model, rec, tokens, tol=0.0, max_loops=MAX)
    assert (np.asarray(loops) == MAX).all()
    np.testing.assert_allclose(
        logits, R.apply(model, rec, tokens, jnp.int32(MAX), backprop=2), rtol=1e-5, atol=1e-5
    )
    logits, loops = R.apply_adaptive(model, rec, tokens, tol=np.inf, max_loops=MAX)
    assert (np.asarray(loops) == 1).all()
    np.testing.assert_allclose(
        logits, R.apply(model, rec, tokens, jnp.int32(1), backprop=2), rtol=1e-5, atol=1e-5
    )


def test_adaptive_loop_counts_are_causal(looped):
    model, rec = looped
    tokens = _tokens()
    logits, loops = R.apply_adaptive(model, rec, tokens, tol=TOL, max_loops=MAX)
    assert len(np.unique(loops)) > 1
    changed = tokens.copy()
    changed[:, 6:] = (changed[:, 6:] + 77) % 256
    logits2, loops2 = R.apply_adaptive(model, rec, changed, tol=TOL, max_loops=MAX)
    np.testing.assert_array_equal(loops[:, :6], loops2[:, :6])
    np.testing.assert_allclose(logits[:, :6], logits2[:, :6], rtol=1e-5, atol=1e-5)


def _generate(model, rec, prompt, n, schedule="depthwise"):
    policy = RD.Looped(rec, tol=TOL, max_loops=MAX, schedule=schedule)
    return dj.generate(model, prompt, n, temperature=0.0, policy=policy)


@pytest.mark.slow
def test_depthwise_batched_generation_equals_one_row_at_a_time(looped):
    model, rec = looped
    prompt = _tokens(B=3, T=5, seed=2)
    batched = _generate(model, rec, prompt, 5)
    assert len(np.unique(batched.loops[:, 5:])) > 1  # rows really loop differently
    for b in range(3):
        alone = _generate(model, rec, prompt[b : b + 1], 5)
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[b])
        np.testing.assert_array_equal(alone.loops[0], batched.loops[b])


@pytest.mark.slow
def test_generation_equals_lockstep_and_the_full_adaptive_forward(looped):
    model, rec = looped
    prompt = _tokens(B=3, T=5, seed=2)
    N = 5
    batched = _generate(model, rec, prompt, N)
    lockstep = _generate(model, rec, prompt, N, schedule="lockstep")
    np.testing.assert_array_equal(batched.tokens, lockstep.tokens)
    np.testing.assert_array_equal(batched.loops, lockstep.loops)
    assert int(batched.ticks) <= int(lockstep.ticks)
    seq = np.concatenate([prompt, np.asarray(batched.tokens[:, :-1])], 1)
    logits, loops = R.apply_adaptive(model, rec, seq, tol=TOL, max_loops=MAX)
    np.testing.assert_array_equal(batched.loops, loops)
    np.testing.assert_array_equal(batched.tokens, np.argmax(logits[:, 4:], -1))


def test_sample_loops_has_the_documented_mean():
    rng = np.random.default_rng(0)
    draws = np.array([R.sample_loops(rng, 4.0) for _ in range(20000)])
    assert abs(draws.mean() - 4.0) < 0.06 and draws.min() >= 1
    capped = [R.sample_loops(rng, 4.0, max_loops=5) for _ in range(2000)]
    assert max(capped) == 5
    p = R.loop_distribution(4.0, max_loops=8, samples=5000)
    assert p.shape == (8,) and abs(p.sum() - 1) < 1e-9


def test_bad_settings_name_the_setting(looped, llama):
    model, rec = looped
    tokens = _tokens()
    for bad in (0, -1, jnp.int32(0), 2.5):
        with pytest.raises(AdaptiveError, match="loops"):
            R.apply(model, rec, tokens, bad)
    with pytest.raises(AdaptiveError, match="backprop"):
        R.apply(model, rec, tokens, jnp.int32(3))
    with pytest.raises(AdaptiveError, match="backprop"):
        R.apply(model, rec, tokens, 3, backprop=0)
    with pytest.raises(AdaptiveError, match="max_loops"):
        R.apply_adaptive(model, rec, tokens, tol=0.1, max_loops=0)
    with pytest.raises(AdaptiveError, match="min_loops"):
        R.apply_adaptive(model, rec, tokens, tol=0.1, max_loops=2, min_loops=3)
    with pytest.raises(AdaptiveError, match="tol"):
        R.apply_adaptive(model, rec, tokens, tol=-1.0, max_loops=2)
    with pytest.raises(AdaptiveError, match="span"):
        R.attach(llama, 2, 2)
    with pytest.raises(AdaptiveError, match="span"):
        R.attach(llama, 1, 9)
    with pytest.raises(AdaptiveError, match="mean"):
        R.sample_loops(np.random.default_rng(0), 0.5)
    with pytest.raises(AdaptiveError, match="injection"):
        R.static_program(*R.attach(llama, 1, 3, inject=True), 2)
    with pytest.raises(AdaptiveError, match="inject"):
        R.apply(llama, R.Recurrence(1, 3, inject=True), tokens, 2)
