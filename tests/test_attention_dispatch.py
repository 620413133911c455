"""Attention dispatch: capability decisions, fallback logging, and pallas == xla end to end."""

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core import attention
from depthjax.core.attention import AttentionUnavailable, Problem, attend, choose, pallas_interpret

GPU = Problem(
    backend="gpu",
    dtype="bfloat16",
    head_dim=128,
    T=4096,
    S=4096,
    causal=True,
    segments=False,
    kv_mask=False,
    interpret=False,
    gpu_capability=(9, 0),
)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(), "cudnn"),
        (dict(dtype="float32"), "pallas"),  # cuDNN is half precision only
        (dict(segments=True), "pallas"),  # cuDNN would need a dense mask
        (dict(dtype="float32", head_dim=96), "xla"),  # Triton wants a power of two
        (dict(head_dim=256), "pallas"),  # cuDNN head_dim <= 128
        (dict(backend="tpu", head_dim=128), "pallas"),
        (dict(backend="tpu", head_dim=64), "xla"),
        (dict(backend="cpu"), "xla"),
        (dict(backend="cpu", interpret=True), "xla"),  # interpreter never chosen by auto
        (dict(T=1, S=4096), "cudnn"),  # decode step: pallas needs T == S
    ],
)
def test_auto_choice(changes, expected):
    assert choose("auto", dataclasses.replace(GPU, **changes)) == expected


@pytest.mark.parametrize(
    "impl,changes,message",
    [
        ("cudnn", dict(backend="cpu"), "needs a GPU"),
        ("cudnn", dict(dtype="float32"), "bfloat16/float16 only"),
        ("cudnn", dict(gpu_capability=(7, 5)), "compute capability"),
        ("pallas", dict(backend="cpu"), "pallas_interpret"),
        ("pallas", dict(head_dim=96), "power of two"),
        ("pallas", dict(T=1), "T == S"),
    ],
)
def test_forced_impl_that_cannot_run_raises(impl, changes, message):
    with pytest.raises(AttentionUnavailable, match=message):
        choose(impl, dataclasses.replace(GPU, **changes))


def test_forced_impls_that_can_run():
    assert choose("pallas", dataclasses.replace(GPU, backend="cpu", interpret=True)) == "pallas"
    assert choose("cudnn", dataclasses.replace(GPU, segments=True)) == "cudnn"  # forced: allowed
    with pytest.raises(ValueError, match="not one of"):
        choose("flash", GPU)


def test_fallback_logged_once_per_reason(caplog):
    attention._logged.clear()
    problem = dataclasses.replace(GPU, dtype="float32", head_dim=96)
    with caplog.at_level(logging.INFO, logger="depthjax.core.attention"):
        for _ in range(3):
            choose("auto", problem)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one per skipped candidate, not per call
    assert "cudnn" in messages[0] and "bfloat16/float16" in messages[0]
    assert "pallas" in messages[1] and "power of two" in messages[1]
    assert all(r.levelno == logging.WARNING for r in caplog.records)  # accelerator -> xla


def test_config_accepts_impls():
    for impl in ("auto", "xla", "cudnn", "pallas"):
        assert dj.ModelConfig(attention_impl=impl).attention_impl == impl
    with pytest.raises(dj.ConfigError, match="attention_impl"):
        dj.ModelConfig(attention_impl="flash")


def test_attend_on_cpu():
    q = k = v = jnp.ones((1, 8, 2, 16))
    assert attend(q, k, v, causal=True, impl="auto").shape == (1, 8, 2, 16)
    with pytest.raises(AttentionUnavailable, match="pallas_interpret"):
        attend(q, k, v, causal=True, impl="pallas")


def test_attend_pallas_equals_xla_with_masks():
    """Segment ids + key padding (right-padded rows all keep a visible key)."""
    B, T, H, K, D = 2, 24, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k, v = jax.random.normal(kk, (B, T, K, D)), jax.random.normal(kv, (B, T, K, D))
    seg = jnp.array([[0] * 10 + [1] * 14, [0] * 24], jnp.int32)
    kv_mask = jnp.arange(T)[None] < jnp.array([[24], [17]])
    kw = dict(causal=True, segment_ids_BT=seg, kv_mask_BS=kv_mask, scale=0.2)
    want = attend(q, k, v, impl="xla", **kw)
    with pallas_interpret():
        got = attend(q, k, v, impl="pallas", **kw)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_model_forward_and_grad_pallas_equals_xla():
    cfg = dj.configs.get("llama-tiny", n_layers=2, attention_impl="xla")
    model = dj.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    seg = jnp.array([[0] * 7 + [1] * 9, [0] * 16], jnp.int32)

    def run(impl):
        config = cfg.replace(attention_impl=impl)

        def loss(params):
            logits = dj.apply(
                dataclasses.replace(model, config=config, params=params), tokens, segment_ids=seg
            )
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params)
        return logits, grads

    want, want_grads = run("xla")
    with pallas_interpret():
        got, got_grads = run("pallas")
    np.testing.assert_allclose(got, want, atol=2e-5)
    chex.assert_trees_all_close(got_grads, want_grads, atol=2e-5)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from depthjax.core.attention import attend, pallas_interpret
    mesh = jax.make_mesh((2, 2), ("data", "tensor"))
    B, T, H, K, D = 4, 32, 4, 2, 16
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(x, (B, T, K, D)) for x in ks[1:])
    seg = jnp.repeat(jnp.arange(4)[None], B, 0).repeat(8, 1).astype(jnp.int32)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    q, k, v = (put(x, P("data", None, "tensor", None)) for x in (q, k, v))
    seg = put(seg, P("data", None))
    want = attend(q, k, v, causal=True, segment_ids_BT=seg, impl="xla")
    f = jax.jit(lambda q, k, v, s: attend(q, k, v, causal=True, segment_ids_BT=s, impl="pallas"))
    with pallas_interpret(), jax.set_mesh(mesh):
        got = f(q, k, v, seg)
        text = str(jax.make_jaxpr(f)(q, k, v, seg))
    assert "shard_map" in text, "pallas attention did not run under shard_map"
    assert got.sharding.spec[0] == "data", got.sharding
    np.testing.assert_allclose(got, want, atol=1e-5)
    loss = lambda impl: lambda q, k, v: jnp.sum(
        jnp.sin(attend(q, k, v, causal=True, segment_ids_BT=seg, impl=impl)))
    with pallas_interpret(), jax.set_mesh(mesh):
        want_g = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
        got_g = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, atol=1e-5)
    print("OK")
""")


@pytest.mark.slow
def test_pallas_under_context_mesh_uses_shard_map():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
