"""depth.fold: gates, per-step scales, LoRA and recovery adapters folded into a plain
sequential table compute the same function (checked against the unfolded model), and
what cannot be folded exactly is refused with the reason."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
from depthjax.depth.folding import FoldError, fold

TOKENS = np.random.default_rng(3).integers(0, 256, (2, 10)).astype(np.int32)
TOL = dict(rtol=1e-5, atol=1e-5)


def _with_adapters(model, steps, *, linear_at=(), final=False, seed=0):
    """Random recovery adapters (bias, plus a rank-2 linear part at `linear_at`)."""
    D_, r = model.config.d_model, 2
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    bias = np.zeros((model.depth, D_), np.float32)
    a = np.zeros((model.depth, D_, r), np.float32)
    b = np.zeros((model.depth, r, D_), np.float32)
    for s in steps:
        bias[s] = 0.3 * np.asarray(jax.random.normal(next(keys), (D_,)))
    for s in linear_at:
        a[s] = 0.2 * np.asarray(jax.random.normal(next(keys), (D_, r)))
        b[s] = 0.2 * np.asarray(jax.random.normal(next(keys), (r, D_)))
    params = dict(model.params)
    params["steps"] = {
        **params.get("steps", {}),
        "adapter": {"bias": jnp.asarray(bias), "a": jnp.asarray(a), "b": jnp.asarray(b)},
    }
    if final:
        params["final_adapter"] = {"bias": 0.3 * jax.random.normal(next(keys), (D_,))}
    return model.replace(params=params)


def _assert_same_function(edited):
    folded = fold(edited)
    assert "steps" not in folded.params and "final_adapter" not in folded.params
    assert np.asarray(folded.program.block).tolist() == list(range(edited.depth))
    assert np.asarray(folded.program.attn).tolist() == [1.0] * edited.depth
    np.testing.assert_allclose(dj.apply(folded, TOKENS), dj.apply(edited, TOKENS), **TOL)
    return folded


@pytest.mark.slow
def test_pre_norm_gates_lora_scales_and_adapter_biases_fold_exactly():
    base = dj.init(dj.configs.get("llama-tiny", tie_embeddings=True), jax.random.key(0))
    tied = D.tie(base, 2)  # 4 steps over 2 shared rows
    relaxed = D.relax(tied, base, rank=4)  # per-step LoRA and deltas
    edited = relaxed.with_program(
        relaxed.program.replace(
            attn=jnp.asarray([1.0, 0.0, 0.5, 1.0]), mlp=jnp.asarray([1.0, 2.0, 1.0, 0.0])
        )
    )
    edited = _with_adapters(edited, [0, 2, 3], linear_at=[0], final=True)
    folded = _assert_same_function(edited)
    # the step-0 adapter changed the embedding, so the head reads an untied copy
    assert not folded.config.tie_embeddings and folded.config.bias


def test_gpt2_step0_linear_adapter_folds_into_token_and_position_embeddings():
    model = dj.init(dj.configs.get("gpt2-tiny"), jax.random.key(1))
    _assert_same_function(_with_adapters(model, [0, 1], linear_at=[0]))


@pytest.mark.parametrize("placement", ["peri", "out"])
def test_output_norm_gates_fold_into_the_norm_scales(placement):
    cfg = dj.configs.get("llama-tiny", norm_placement=placement, embed_scale=8.0)
    model = dj.init(cfg, jax.random.key(2))
    model = model.with_program(
        dj.Program.create([0, 1, 1, 3], attn=[1, 0, 0.5, 1], mlp=[0, 1, 1, 3])
    )
    _assert_same_function(_with_adapters(model, [0], linear_at=[0]))


@pytest.mark.parametrize(
    "preset, kwargs, match",
    [
        ("llama-tiny", dict(steps=[2], linear_at=[2]), "step 2.*linear part"),
        ("llama-tiny", dict(steps=[], final=True, linear_at=[]), None),  # bias-only final: fine
        ("gemma2-tiny", dict(steps=[1]), "step 1.*peri-norm"),
        ("bert-tiny", dict(steps=[0]), "embed_norm"),
    ],
)
def test_what_cannot_be_folded_is_refused(preset, kwargs, match):
    model = _with_adapters(dj.init(dj.configs.get(preset), jax.random.key(0)), **kwargs)
    if match is None:
        _assert_same_function(model)
        return
    with pytest.raises(FoldError, match=match):
        fold(model)


def test_post_norm_gates_are_refused():
    model = dj.init(dj.configs.get("bert-tiny"), jax.random.key(0))
    with pytest.raises(FoldError, match="post-norm"):
        fold(model.with_program(dj.Program.create([0, 1, 2, 3], mlp=[1, 0.5, 1, 1])))
