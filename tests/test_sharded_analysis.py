"""Sharded analysis: the research loop on a model whose parameters are sharded over a
(fsdp=4, tensor=2) mesh of 8 fake CPU devices equals the loop on one device, and no
device holds more than its eighth of the weights plus the replicated norms.

The loop runs in a subprocess (tests/sharded_analysis_worker.py): the device count is fixed
when jax starts, and this process has one device.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax.core import sharding as shd
from tests.test_train import ROOT, _env

STEPS = [  # every step of the loop the worker compares
    "hf.load",
    "block_influence",
    "relative_contribution",
    "ablation",
    "shapley",
    "gate_gradient",
    "prune",
    "recover_bias",
    "recover_linear",
    "recover_lora",
    "recover_distill",
    "perplexity",
    "multiple_choice",
    "search",
    "generate",
    "export",
    "dj.load",
    "gguf",
]


def _on_8_devices(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` with 8 fake CPU devices (fixed when jax starts), checked."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # 2-core machine: 126 s cold, 42 s with the compile cache (two compiles)
def test_research_loop_sharded_over_8_devices_equals_one_device(tmp_path):
    proc = _on_8_devices("tests.sharded_analysis_worker", str(tmp_path / "llama"))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    b = report["bytes"]
    assert b["max_device"] <= b["total"] / 8 + b["replicated"]
    assert b["replicated"] < b["total"] / 100  # only norms are replicated
    assert report["forward_temp"] < b["total"] / 2  # the forward never gathers the model
    # models the loop makes (pruned, recovered, searched) keep the blocks sharded: an
    # eighth of the matrices plus the replicated norms (about 2%) per device
    for name, fraction in report["max_device"].items():
        assert fraction < 0.13, (name, fraction)
    assert report["same_as_dj.shard"] and report["dj.load_sharded"]
    errors = report["error"]
    expected = STEPS + (["harness"] if os.environ.get("DEPTHJAX_REQUIRE_LM_EVAL") == "1" else [])
    assert set(expected) <= set(errors)
    # |sharded - single| <= 1e-5 + 1e-5 |single| for every output; greedy tokens, ablation
    # and the loaded and exported weights exactly
    assert {k: v for k, v in errors.items() if v > 1} == {}
    assert errors["generate"] == errors["hf.load"] == errors["export"] == errors["dj.load"] == 0
    assert errors["gguf"] == 0 and report["gguf_same_header"]
    # llama-tiny's vocabulary + 1 is odd: tensor=2 cannot split it, the warning says where
    (warning,) = report["unsharded_warning"]
    assert "head/out/kernel: vocab 257 over tensor=2" in warning
    assert "embed/tok/embedding: vocab 257 over tensor=2" in warning
    assert report["odd_vocab_spec"] == str(jax.sharding.PartitionSpec("fsdp", None))


def test_bad_meshes_raise_named_errors(tmp_path):
    with pytest.raises(dj.ShardingError, match="1 are available"):
        shd.make_mesh(data=1, fsdp=4, tensor=2)
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    other = jax.sharding.Mesh(jax.devices()[:1], ("x",))
    with pytest.raises(dj.ShardingError, match=r"lack \['data', 'fsdp', 'tensor'\]"):
        dj.shard(model, other)
    dj.hf.save(model, tmp_path / "m")
    with pytest.raises(dj.hf.HFError, match="mesh= or shardings=, not both"):
        dj.hf.load(tmp_path / "m", mesh=shd.make_mesh(), shardings=jax.devices()[0])
    with pytest.raises(dj.ShardingError, match="lack"):
        dj.hf.load(tmp_path / "m", mesh=other)


def test_shard_on_one_device_mesh_is_the_model(tmp_path):
    """The 1-device mesh: dj.shard and load(mesh=) place every leaf, changing nothing."""
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    mesh = shd.make_mesh()
    placed = dj.shard(model, mesh)
    assert all(
        isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(placed.params)
    )
    dj.save(model, tmp_path / "n")
    for loaded in (placed, dj.load(tmp_path / "n", mesh=mesh)):
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params)):
            assert (a == b).all()


@pytest.mark.slow  # two CLI runs on 8 fake devices: ~40 s on the 2-core machine
def test_cli_mesh_shards_the_model_and_scores_as_one_device(tmp_path):
    dj.hf.save(
        dj.init(dj.configs.get("llama-tiny", max_seq_len=64), jax.random.key(0)), tmp_path / "m"
    )

    def score(*mesh):
        out = tmp_path / ("scores" + "".join(mesh))
        flags = ["--batches", "1", "--batch-size", "4", "--seq-len", "16", "--max-remove", "1"]
        flags += ["--shapley-permutations", "1", "--out", str(out), "--quiet"]
        mesh_flags = ["--mesh", *mesh] if mesh else []
        proc = _on_8_devices(
            "depthjax.cli", "score", "--model", str(tmp_path / "m"), *flags, *mesh_flags
        )
        return json.loads((out / "scores.json").read_text()), proc.stderr

    (one, _), (sharded, log) = score(), score("fsdp=4,tensor=2")
    # 1/8 of the matrices plus the replicated norms
    assert (
        "sharded over {'data': 1, 'fsdp': 4, 'tensor': 2}: the busiest of 8 devices holds 12.7%"
        in log
    )
    for name, score in one["scores"].items():
        for key in ("values", "residual_norm"):
            if key in score:
                got, want = sharded["scores"][name][key], score[key]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    for name, ys in one["removal_curves"].items():
        np.testing.assert_allclose(sharded["removal_curves"][name], ys, rtol=1e-4, err_msg=name)


def test_cli_mesh_errors_name_the_problem(tmp_path, capsys):
    from depthjax.cli import main

    dj.hf.save(dj.init(dj.configs.get("llama-tiny"), jax.random.key(0)), tmp_path / "m")
    run = ["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--mesh"]
    with pytest.raises(SystemExit) as usage:
        main([*run, "fsdp=x"])
    assert usage.value.code == 2
    assert "'fsdp=x': 'x' is not an integer" in capsys.readouterr().err
    assert main([*run, "fsdp=3"]) == 2
    assert "1 devices cannot be split into mesh" in capsys.readouterr().err
