"""Runtime skipping in dj.apply: a sublayer whose gate is 0 is not computed, and outputs
and gradients equal gating by multiplication (the dense `Block` module, the naive
reference forward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.block import Block
from depthjax.core.model import Embed, output_head
from depthjax.core.program import Program
from tests import reference
from tests.test_model import _model

FAMILIES = {  # every norm placement, and the GPT-J parallel block
    "pre": dj.configs.get("llama-tiny"),
    "peri": dj.configs.get("llama-tiny", norm_placement="peri"),
    "post": dj.configs.get("bert-tiny"),
    "gptj": dj.configs.get("gpt2-tiny", parallel_block=True),
    "out": dj.configs.get("olmo2-tiny"),  # OLMo 2: norms on the sublayers' outputs
}
# pre-norm runs by default; the other placements with -m slow (each compiles a model's
# forward and gradient both ways)
FAMILY_CASES = [n if n == "pre" else pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES]
BLOCKS = [0, 1, 2, 3, 1]
ATTN = np.array([1.0, 0.0, 0.5, 0.0, 1.0], np.float32)
MLP = np.array([0.0, 1.0, 1.0, 0.0, 2.0], np.float32)


def dense_forward(model, tokens, attn, mlp):
    """Gating by multiplication: `Block.__call__` (both sublayers always run) in a loop."""
    cfg, p = model.config, model.params
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = Embed(cfg).apply({"params": p["embed"]}, tokens, pos)
    for i, b in enumerate(BLOCKS):
        row = jax.tree.map(lambda t, b=b: t[b], p["blocks"])
        u_attn, u_mlp = Block(cfg).apply({"params": row}, x, attn[i], mlp[i], pos)
        x = x + (u_attn + u_mlp)
    return output_head(cfg, p, x)


def skipping_forward(model, tokens, attn, mlp):
    return dj.apply(
        model.replace(
            program=Program(jnp.asarray(BLOCKS, jnp.int32), attn, mlp, jnp.zeros(len(BLOCKS), bool))
        ),
        tokens,
    )


def _loss(forward, tokens, weights):
    return lambda params, attn, mlp, model: jnp.sum(
        forward(model.replace(params=params), tokens, attn, mlp) * weights
    )


@pytest.fixture(scope="module")
def weights(tokens):
    return jax.random.normal(jax.random.key(3), tokens.shape + (256,))


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_skipping_equals_gating_outputs_and_gradients(name, tokens, weights):
    model = _model(FAMILIES[name])
    grads = {}
    for label, fwd in (("skip", skipping_forward), ("dense", dense_forward)):
        f = jax.jit(jax.value_and_grad(_loss(fwd, tokens, weights), argnums=(0, 1, 2)))
        grads[label] = f(model.params, ATTN, MLP, model)
    # gradients w.r.t. the parameters and w.r.t. every gate, including the gates at 0
    # (d loss / d gate there is the skipped sublayer's contribution: not 0)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
        grads["skip"],
        grads["dense"],
    )
    attn_grad = np.asarray(grads["skip"][1][1])
    assert np.all(np.abs(attn_grad[[1, 3]]) > 1e-6), attn_grad


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_zero_and_one_gates_match_naive_forward(name, tokens):
    model = _model(FAMILIES[name])
    attn, mlp = (ATTN > 0).astype(np.float32), (MLP > 0).astype(np.float32)
    groups = [[(b, float(a), float(m))] for b, a, m in zip(BLOCKS, attn, mlp)]
    want = reference.forward(model, tokens, groups)
    np.testing.assert_allclose(
        skipping_forward(model, tokens, attn, mlp), want, rtol=2e-5, atol=2e-5
    )


def _poisoned(model, row, sublayer):
    """The model with NaN weights in `sublayer` of table row `row`."""
    blocks = dict(model.params["blocks"])
    blocks[sublayer] = jax.tree.map(lambda t: t.at[row].set(jnp.nan), blocks[sublayer])
    return model.replace(params={**model.params, "blocks": blocks})


def test_a_gated_off_sublayer_is_not_computed(tokens, weights):
    """NaN weights where the gate is 0: a skipped sublayer never touches them (gating by
    multiplication gives 0 * NaN = NaN), in the forward and in the gradient."""
    model = _model(FAMILIES["pre"])
    # row 1 runs only at step 1 (attention off) and step 4 (on): poison row 3 instead,
    # which runs only at step 3, where both gates are 0
    for sublayer in ("attn", "mlp"):
        poisoned = _poisoned(model, 3, sublayer)
        loss = _loss(skipping_forward, tokens, weights)
        value, grads = jax.jit(jax.value_and_grad(loss))(poisoned.params, ATTN, MLP, poisoned)
        assert np.isfinite(value)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        assert not np.isfinite(dense_forward(poisoned, tokens, ATTN, MLP)).all()


@pytest.mark.slow
def test_vmap_over_programs_selects_and_stays_exact(tokens):
    """Under vmap with batched gates the cond becomes a select (every sublayer runs):
    results still equal each program run alone, outputs and gradients."""
    model = _model(FAMILIES["pre"])
    attn = jnp.stack([ATTN, 1 - (ATTN > 0), jnp.ones(5)])
    mlp = jnp.stack([MLP, jnp.ones(5), 1 - (MLP > 0)])
    loss = lambda params, a, m: jnp.sum(
        skipping_forward(model.replace(params=params), tokens, a, m) ** 2
    )
    f = jax.jit(jax.value_and_grad(loss))
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0, 0)))(
        model.params, attn, mlp
    )
    for k in range(3):
        jax.tree.map(
            lambda a, b, k=k: np.testing.assert_allclose(a[k], b, rtol=1e-4, atol=1e-4),
            batched,
            f(model.params, attn[k], mlp[k]),
        )


def test_one_compile_for_every_gate_pattern(tokens):
    model = _model(FAMILIES["pre"])
    forward = jax.jit(dj.apply)
    for attn, mlp in ((ATTN, MLP), (np.ones(5), np.zeros(5)), (np.zeros(5), np.ones(5))):
        forward(model.with_program(Program.create(BLOCKS, attn, mlp)), tokens)
    assert forward._cache_size() == 1


def test_gate_only_batches_share_their_rows(tokens):
    """map_programs over a batch that differs only in gates maps the gates alone (block ids
    and flags kept once): same outputs as mapping whole programs."""
    from depthjax.core.program import map_programs, share_structure

    model = _model(FAMILIES["pre"])
    attn = jnp.stack([ATTN, jnp.ones(5), 1 - (ATTN > 0)])
    stacked = Program(
        jnp.tile(jnp.asarray(BLOCKS, jnp.int32), (3, 1)),
        attn,
        jnp.ones((3, 5)),
        jnp.zeros((3, 5), bool),
    )
    shared = share_structure(stacked)
    assert shared.block.shape == (5,) and shared.attn.shape == (3, 5)
    assert share_structure(stacked.replace(block=stacked.block.at[1, 0].set(2))).block.ndim == 2
    run = jax.jit(
        lambda m, p: map_programs(lambda q: dj.apply(m.replace(program=q), tokens), p, batch_size=2)
    )
    np.testing.assert_allclose(run(model, shared), run(model, stacked), rtol=1e-5, atol=1e-5)
