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
    "perplexity",
    "multiple_choice",
    "search",
    "generate",
    "export",
    "dj.load",
]


@pytest.mark.slow  # 2-core machine: 126 s cold, 42 s with the compile cache (two compiles)
def test_research_loop_sharded_over_8_devices_equals_one_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_analysis_worker", str(tmp_path / "llama")],
        env=_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
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
