"""train_step against references: gradient accumulation equals one big batch, frozen leaves
stay bit-identical, the loss equals a naive cross-entropy, MFU FLOP counts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core import flops
from depthjax.train import config as train_config
from depthjax.train.step import (
    TrainState,
    learning_rate,
    loss_sums,
    optimizer,
    train_step,
    trainable_mask,
)


def _setup(*keys):
    tc = train_config.parse(["model.n_layers=2", "warmup_steps=0", "lr=1e-2", *keys])
    cfg = tc.model_config()
    model = dj.init(cfg, jax.random.key(0))
    mask = trainable_mask(model.params, tc.trainable)
    tx = optimizer(tc)
    state = TrainState(
        jnp.int32(0),
        model.params,
        tx.init(jax.tree.map(lambda m, x: x if m else None, mask, model.params)),
        jnp.int32(-1),
        jnp.int32(0),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 17)).astype(np.int32)
    seg = np.ones((4, 16), np.int32)
    seg[1, 10:] = 2
    seg[3, 12:] = 0  # padding
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": seg,
        "positions": np.asarray(dj.core.model.segment_positions(jnp.asarray(seg))),
    }
    step = jax.jit(
        lambda s, b, accum: train_step(
            s,
            b,
            model.program,
            cfg=cfg,
            tx=tx,
            mask=mask,
            grad_accum=accum,
            nan_policy=tc.nan_policy,
            schedule=learning_rate(tc),
        ),
        static_argnums=2,
    )
    return model, state, batch, step


def test_loss_matches_naive_cross_entropy():
    model, _, batch, _ = _setup()
    total, count = loss_sums(model.params, model.config, model.program, batch)
    logits = dj.apply(
        model, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )
    logp = np.asarray(jax.nn.log_softmax(logits))
    w = batch["segment_ids"] > 0
    naive = -sum(logp[b, t, batch["targets"][b, t]] for b in range(4) for t in range(16) if w[b, t])
    assert count == w.sum()
    np.testing.assert_allclose(total, naive, rtol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch():
    _, state, batch, step = _setup()
    one, m1 = step(state, batch, 1)
    two, m2 = step(state, batch, 2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    # Adam's first step is ~lr * sign(grad): near-zero gradients may flip, so allow 1% of lr.
    chex.assert_trees_all_close(one.params, two.params, atol=1e-4)


def test_only_selected_subtree_is_trained():
    model, state, batch, step = _setup("trainable=blocks/attn/")
    new, _ = step(state, batch, 1)
    changed = jax.tree_util.tree_map_with_path(
        lambda p, a, b: (jax.tree_util.keystr(p), bool((np.asarray(a) != np.asarray(b)).any())),
        model.params,
        new.params,
    )
    for path, did in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)):
        assert did == ("['blocks']['attn']" in path), path
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask(model.params, "lora")


def test_flops_per_token_counts_matmul_weights():
    cfg = dj.configs.get("llama-tiny")
    params = dj.init(cfg, jax.random.key(0)).params
    # Every matmul weight is used once per token: all block kernels plus the output head.
    n_matmul = (
        sum(
            x.size
            for p, x in jax.tree_util.tree_leaves_with_path(params["blocks"])
            if "kernel" in jax.tree_util.keystr(p)
        )
        + params["head"]["out"]["kernel"].size
    )
    assert flops.matmul_params_per_token(cfg) == n_matmul
    T = 128
    attn = 4 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim
    assert flops.train_flops_per_token(cfg, T) == 3 * (2 * n_matmul + attn)


@pytest.mark.slow
def test_only_the_lora_of_a_relaxed_model_is_trained():
    """Uptraining a relaxed recursive model: the shared table stays, per-step LoRA learns."""
    base, _, batch, _ = _setup()
    model = dj.depth.relax(dj.depth.tie(base, 1), base, rank=2)
    tc = train_config.parse(["warmup_steps=0", "lr=1e-2", "trainable=steps/lora/"])
    mask = trainable_mask(model.params, tc.trainable)
    tx = optimizer(tc)
    state = TrainState(
        jnp.int32(0),
        model.params,
        tx.init(jax.tree.map(lambda m, x: x if m else None, mask, model.params)),
        jnp.int32(-1),
        jnp.int32(0),
    )
    new, metrics = jax.jit(
        lambda s, b: train_step(
            s,
            b,
            model.program,
            cfg=model.config,
            tx=tx,
            mask=mask,
            grad_accum=1,
            nan_policy=tc.nan_policy,
            schedule=learning_rate(tc),
        )
    )(state, batch)
    assert np.isfinite(metrics["loss"])
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(model.params), jax.tree.leaves(new.params)
    ):
        key = jax.tree_util.keystr(path)
        changed = bool((np.asarray(a) != np.asarray(b)).any())
        assert changed == key.startswith("['steps']['lora']"), key
