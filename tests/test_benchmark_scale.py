"""benchmarks/scale.py end to end at a tiny shape: the checkpoint written by transformers,
every depthjax stage, the transformers baseline and the export reloaded by transformers
(the script fails when the reloaded logits differ from depthjax's)."""

import json
import os
import subprocess
import sys

import pytest

from .test_hf_parity import REPO, _reference_python

TINY = (
    "--layers 4 --d-model 64 --heads 4 --kv-heads 2 --d-ff 128 --vocab 512 --batch 2 "
    "--seq-len 16 --calib 2 --mc-items 2 --ppl-docs 1 --ppl-bytes 32 --latency-batches 1,2 "
    "--repeat 1"
).split()


@pytest.mark.slow
def test_scale_benchmark_runs_at_a_tiny_shape(tmp_path):
    env = {**os.environ, "DEPTHJAX_REF_PYTHON": _reference_python(), "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "scale.py"), *TINY]
        + ["--json", str(tmp_path / "scale.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "export reloaded in transformers" in out.stdout and " ok" in out.stdout
    result = json.loads((tmp_path / "scale.json").read_text())
    assert set(result["transformers"]) == {"load", "forward", "ablations", "reload in transformers"}
    assert {"load", "forward", "ablations", "recover linear", "export"} <= set(result["depthjax"])
    assert result["export_error"] <= 1e-2
    assert set(result["latency"]["ms"]) == {"1", "2"}
    assert result["latency"]["flop_ratio"]["pruned"] < 1
