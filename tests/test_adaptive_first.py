"""FiRST against independent references: a router that keeps every step is the full
model; a row's decision is an ordinary program (dj.depth.drop), whose dj.apply and
dj.generate the routed forward and the batched routed decoding must reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.adaptive import AdaptiveError, first, routed_decode


@pytest.fixture(scope="module")
def routed(llama):
    model, spec = first.attach(llama, 1, jax.random.key(1))
    return llama, model, spec


def _with_bias(model, b2):
    return model.replace(
        params={
            **model.params,
            "first": {**model.params["first"], "b2": jnp.asarray(b2, jnp.float32)},
        }
    )


def _tokens(B=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, T)).astype(np.int32)


def test_router_keeping_every_step_is_the_full_model(routed):
    base, model, spec = routed
    tokens = _tokens()
    logits, gates = first.apply(model, spec, tokens, prompt_len=6)  # fresh router: all run
    assert (np.asarray(gates) == 1).all()
    np.testing.assert_allclose(logits, dj.apply(base, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_each_row_runs_its_own_program_in_forward_and_decoding(routed):
    """Per-row decisions from a router whose output depends on the prompt: row b's logits
    and greedy tokens equal those of dj.depth.drop(model, its skipped steps)."""
    base, model, spec = routed
    p = model.params["first"]
    w2 = jnp.zeros_like(p["w2"]).at[:, 2].set(40.0 * jnp.sign(p["w2"][:, 2] + 1e-3))
    model = model.replace(
        params={**model.params, "first": {**p, "w2": w2, "b2": jnp.array([0.0, 5.0, 0.0, -5.0])}}
    )
    prompts = _tokens(B=4, T=6, seed=3)
    run = np.asarray(first.choose(model, spec, prompts))
    assert not run[:, 3].any() and run[:, 1].all()
    assert len({tuple(r) for r in run}) > 1, "rows should pick different programs"
    tokens = np.concatenate([prompts, _tokens(B=4, T=4, seed=4)], 1)
    logits, gates = first.apply(model, spec, tokens, prompt_len=6)
    np.testing.assert_array_equal(np.asarray(gates) > 0.5, run)
    policy = routed_decode.Routed(row_steps=first.choose(model, spec, prompts))
    toks = dj.generate(model, prompts, 4, temperature=0.0, policy=policy).tokens
    for choice in {tuple(r) for r in run}:  # one reference compile per distinct program
        rows = np.flatnonzero((run == choice).all(1))
        program = first.program_for(model, np.asarray(choice))
        assert program.depth == sum(choice)
        np.testing.assert_allclose(
            logits[rows], dj.apply(program, tokens[rows]), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_array_equal(
            toks[rows], dj.generate(program, prompts[rows], 4, temperature=0.0).tokens
        )
    # a router that keeps every step decodes exactly like the full model
    keep_all = _with_bias(model, [5.0] * model.depth)
    keep_all = keep_all.replace(
        params={**keep_all.params, "first": {**keep_all.params["first"], "w2": jnp.zeros_like(w2)}}
    )
    run = first.choose(keep_all, spec, prompts)
    policy = routed_decode.Routed(row_steps=run)
    toks = dj.generate(keep_all, prompts, 4, temperature=0.0, policy=policy).tokens
    assert np.asarray(run).all()
    np.testing.assert_array_equal(toks, dj.generate(base, prompts, 4, temperature=0.0).tokens)


@pytest.mark.slow
def test_loss_trains_only_the_router_and_prices_the_steps(routed):
    _, model, spec = routed
    tokens = _tokens()
    grads = jax.grad(
        lambda p: first.loss(model.replace(params=p), spec, tokens, prompt_len=6, cost=1.0)[0]
    )(model.params)
    assert float(jnp.abs(grads["first"]["b2"][1:]).min()) > 0
    assert float(grads["first"]["b2"][0]) == 0  # the steps before the router always run


def test_bad_settings_name_the_setting(routed):
    base, model, spec = routed
    with pytest.raises(AdaptiveError, match="after"):
        first.attach(base, 0, jax.random.key(0))
    with pytest.raises(AdaptiveError, match="after"):
        first.attach(base, base.depth, jax.random.key(0))
    with pytest.raises(AdaptiveError, match="router"):
        first.apply(base, spec, _tokens(), prompt_len=6)
    with pytest.raises(AdaptiveError, match="prompt_len"):
        first.apply(model, spec, _tokens(), prompt_len=12)
    with pytest.raises(AdaptiveError, match="selection"):
        first.program_for(model, [True, False])
