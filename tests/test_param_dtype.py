"""param_dtype: weights stored apart from the compute dtype (issue 29).

References: a bfloat16 model must equal the float32 model with its weights rounded
(`astype`), weight for weight and logit for logit (bfloat16 -> float32 is exact, so with a
float32 compute dtype the two forwards are the same computation); files are checked by
their safetensors headers; peak memory is bounded by the checkpoint's own byte count.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.config import ConfigError
from depthjax.core.loss import nll_sums

BF16 = jnp.bfloat16


def _cast(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), params)


def _assert_same(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def _header_dtypes(path) -> set[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def models():
    cfg = dj.configs.get("llama-tiny", vocab_size=64, n_layers=2)
    return dj.init(cfg, jax.random.key(0)), dj.init(cfg, jax.random.key(0), param_dtype="bfloat16")


def test_config_validates_param_dtype():
    with pytest.raises(ConfigError, match="param_dtype='int8' is not one of"):
        dj.ModelConfig(param_dtype="int8")
    assert dj.ModelConfig().param_dtype == "float32"


def test_init_in_bfloat16_is_the_float32_init_rounded(models):
    f32, b16 = models
    assert b16.config.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(b16.params)} == {"bfloat16"}
    _assert_same(_cast(f32.params, BF16), b16.params)


def test_bfloat16_weights_compute_in_float32_exactly(models):
    """Logits, loss and trace statistics are float32, and equal the float32 model's with
    rounded weights (the compute dtype is float32, the weights are only stored narrower)."""
    f32, b16 = models
    rounded = f32.replace(params=_cast(_cast(f32.params, BF16), jnp.float32))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    apply = jax.jit(dj.apply)
    got = apply(b16, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(apply(rounded, tokens)))
    total, count = nll_sums(got, tokens)
    assert total.dtype == count.dtype == jnp.float32
    stats = dj.metrics.trace_statistics(b16, tokens)
    assert {np.asarray(v).dtype for v in stats.values()} == {np.dtype(np.float32)}


def test_linear_recovery_of_bfloat16_weights_fits_in_float32(models):
    """The fit reads float32 statistics of the same forward, so it equals the fit on the
    float32 model with rounded weights, and its adapters are float32."""
    f32, b16 = models
    rounded = f32.replace(params=_cast(_cast(f32.params, BF16), jnp.float32))
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 64)
    fits = [
        dj.recover(dj.depth.drop(m, [1]), m, tokens, method="linear", rank=4)
        for m in (b16, rounded)
    ]
    adapters = [m.params["steps"]["adapter"] for m in fits]
    assert {str(x.dtype) for x in jax.tree.leaves(adapters[0])} == {"float32"}
    for a, b in zip(jax.tree.leaves(adapters[0]), jax.tree.leaves(adapters[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_compute_has_float32_logits(models):
    _, b16 = models
    tokens = jnp.zeros((1, 4), jnp.int32)
    assert dj.apply(b16.replace(config=b16.config.replace(dtype="bfloat16")), tokens).dtype == (
        jnp.float32
    )


def test_hf_load_in_bfloat16_is_the_float32_load_rounded(models, tmp_path):
    """From a float32 file and from a bfloat16 one (written by dj.hf.save of the bfloat16
    model), Gemma's offset norms (1 + w, arithmetic in the loader) included."""
    f32, b16 = models
    gemma = dj.init(dj.configs.get("gemma2-tiny", vocab_size=64, n_layers=2), jax.random.key(2))
    for name, model in (("llama", f32), ("gemma", gemma)):
        dj.hf.save(model, str(tmp_path / name))
        assert _header_dtypes(tmp_path / name / "model.safetensors") == {"F32"}
        full = dj.hf.load(str(tmp_path / name))
        half = dj.hf.load(str(tmp_path / name), param_dtype="bfloat16")
        assert half.config.param_dtype == "bfloat16"
        _assert_same(_cast(full.params, BF16), half.params)
    dj.hf.save(b16, str(tmp_path / "b16"))
    assert _header_dtypes(tmp_path / "b16" / "model.safetensors") == {"BF16"}
    with open(tmp_path / "b16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    _assert_same(dj.hf.load(str(tmp_path / "b16"), param_dtype="bfloat16").params, b16.params)
    # widening is exact: the float32 load of the bfloat16 file is the bfloat16 weights
    _assert_same(dj.hf.load(str(tmp_path / "b16")).params, _cast(b16.params, jnp.float32))


def test_native_checkpoints_keep_their_dtype(models, tmp_path):
    f32, b16 = models
    dj.save(b16, tmp_path / "b16")
    assert _header_dtypes(tmp_path / "b16" / "params.safetensors") == {"BF16"}
    back = dj.load(tmp_path / "b16")
    assert back.config.param_dtype == "bfloat16"
    _assert_same(back.params, b16.params)
    widened = dj.load(tmp_path / "b16", param_dtype="float32")
    assert widened.config.param_dtype == "float32"
    _assert_same(widened.params, _cast(b16.params, jnp.float32))
    # weights cast by hand before saving: the config follows the weights
    cast_by_hand = f32.replace(params=_cast(f32.params, BF16))
    dj.save(cast_by_hand, tmp_path / "by_hand")
    assert dj.load(tmp_path / "by_hand").config.param_dtype == "bfloat16"


def test_cli_param_dtype(models, tmp_path):
    f32, _ = models
    dj.hf.save(f32, str(tmp_path / "hf"))
    from depthjax.cli import main

    code = main(
        [
            "convert",
            "--from",
            "hf",
            str(tmp_path / "hf"),
            "--to",
            str(tmp_path / "native"),
            "--param-dtype",
            "bfloat16",
        ]
    )
    assert code == 0
    assert dj.load(tmp_path / "native").config.param_dtype == "bfloat16"
    _assert_same(dj.load(tmp_path / "native").params, _cast(f32.params, BF16))


def test_relaxed_lora_on_bfloat16_rows_is_float32(models):
    """LoRA factors are float32 whatever the rows' dtype (the rule of core/step_params):
    full rank reproduces the untied model's logits as it does in float32."""
    _, b16 = models
    tied = dj.depth.tie(b16, 1)
    relaxed = dj.depth.relax(tied, b16, rank="full")
    lora = relaxed.params["steps"]["lora"]
    assert {str(x.dtype) for x in jax.tree.leaves(lora)} == {"float32"}
    tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, 64)
    apply = jax.jit(dj.apply)
    np.testing.assert_allclose(apply(relaxed, tokens), apply(b16, tokens), atol=2e-3)


_RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    def kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    import jax, depthjax as dj
    warm = dj.hf.load(sys.argv[2], param_dtype="bfloat16")  # compilers and pools warmed up
    del warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = kib("VmRSS:")
    model = dj.hf.load(sys.argv[1], param_dtype="bfloat16", progress=False)
    jax.block_until_ready(model)
    print(json.dumps({"base": base, "peak": kib("VmHWM:"), "rss": kib("VmRSS:")}))
    """
)


def test_loading_peak_memory_is_the_checkpoint_plus_one_group(tmp_path):
    """A ~100 MB bfloat16 checkpoint: the loader's peak resident memory above the resident
    memory before the load (jax and depthjax imported, a tiny load done) is at most the
    checkpoint's bytes plus its largest stacked tensor group, + 32 MiB for XLA compiling
    the layout conversions (measured: ~21 MiB). Reading through a memory map, or through
    float32, would add another checkpoint's worth (116 MB here)."""
    cfg = dj.configs.get(
        "llama-tiny",
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        n_kv_heads=4,
        d_ff=1536,
        n_layers=8,
        param_dtype="bfloat16",
    )
    # constant weights: the values do not matter here, and random ones take long to draw
    shapes = jax.eval_shape(lambda k: dj.init(cfg, k).params, jax.random.key(0))
    params = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    model = dj.DepthModel(cfg, params, dj.Program.sequential(cfg.n_layers))
    dj.hf.save(model, str(tmp_path / "big"))
    small = dj.init(cfg.replace(vocab_size=64, n_layers=2, d_model=64, d_ff=64), jax.random.key(0))
    dj.hf.save(small, str(tmp_path / "small"))
    nbytes = os.path.getsize(tmp_path / "big" / "model.safetensors")
    group = max(x.nbytes for x in jax.tree.leaves(model.params))
    del model
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(tmp_path / "big"), str(tmp_path / "small")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert 90e6 < nbytes < 130e6
    assert m["rss"] - m["base"] >= 0.9 * nbytes  # the weights are resident
    assert m["peak"] - m["base"] <= nbytes + group + 32 * 2**20, (m, nbytes, group)


def test_training_refuses_bfloat16_master_weights(tmp_path, capsys):
    from depthjax.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "model.param_dtype=bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "model.param_dtype=bfloat16: training keeps float32 master weights" in err
    assert "model.dtype=bfloat16" in err


@pytest.mark.slow  # one compile of the train step: ~15 s
def test_training_from_a_bfloat16_checkpoint_holds_float32_master_weights(tmp_path):
    from depthjax.cli import main

    cfg = dj.configs.get("llama-tiny", n_layers=2, param_dtype="bfloat16")
    dj.save(dj.init(cfg, jax.random.key(0)), tmp_path / "bf16")
    run = ["train", "--out", str(tmp_path / "run"), "--quiet", f"init_from={tmp_path / 'bf16'}"]
    assert main([*run, "steps=1", "batch_size=2", "seq_len=16"]) == 0
    trained = dj.load(tmp_path / "run" / "model")
    assert trained.config.param_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(trained.params)} == {np.dtype("float32")}
