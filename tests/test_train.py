"""Training runs: resume after kill -9 (also mid-save) is bit-exact, corrupt checkpoints are
skipped, NaN handling, a 2x2x2 mesh matches one device, metrics/TensorBoard output."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=llama-tiny", "model.n_layers=2", "batch_size=4", "seq_len=32", "seed=3",
        "warmup_steps=2", "lr=3e-3", "log_every=1", "shuffle_window=16", "tensorboard=false"]


# Subprocess runs share a persistent compilation cache: compiling dominates a tiny run.
_CACHE = {"JAX_COMPILATION_CACHE_DIR": str(Path(__import__("tempfile").gettempdir())
                                           / "depthjax-test-jax-cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _env(devices=1, extra=None):
    return {**os.environ, **_CACHE, **(extra or {}), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _train(out, *keys, env=None, devices=1, check=True):
    """`depthjax train` in a subprocess (fresh JAX, so the device count can be set)."""
    env = _env(devices, env)
    proc = subprocess.run([sys.executable, "-m", "depthjax.cli", "train", "--out", str(out),
                           *TINY, *keys], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _losses(out) -> dict[int, list[float]]:
    """step -> every loss logged for it (a resumed run logs some steps twice)."""
    seen: dict[int, list[float]] = {}
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        seen.setdefault(r["step"], []).append(r["loss"])
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _train(out, "steps=6", "checkpoint_every=2")
    return _losses(out)


def test_metrics_have_required_fields(reference, tmp_path_factory):
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    first = reference[1][0]
    assert abs(first - np.log(256)) < 0.3  # untrained byte model: about uniform
    assert min(reference[6]) < first      # and it learns


def test_kill9_then_resume_is_bit_exact(reference, tmp_path):
    out = tmp_path / "run"
    env = _env()
    proc = subprocess.Popen([sys.executable, "-m", "depthjax.cli", "train", "--out", str(out),
                             *TINY, "steps=6", "checkpoint_every=2", "log_every=1"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # kill once step 3 is logged
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(metrics.read_text().splitlines()) < 6, "the run finished before it was killed"
    _train(out, "steps=6", "checkpoint_every=2")
    got = _losses(out)
    assert sorted(got) == sorted(reference)
    for step, losses in got.items():
        assert all(loss == reference[step][0] for loss in losses), (step, losses, reference[step])


def test_kill9_during_a_save_resumes_from_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    proc = _train(out, "steps=6", "checkpoint_every=2",
                  env={"DEPTHJAX_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    proc = _train(out, "steps=6", "checkpoint_every=2")
    assert "resumed from checkpoint 2" in proc.stderr
    got = _losses(out)
    for step, losses in got.items():
        assert all(loss == reference[step][0] for loss in losses), (step, losses)


def test_truncated_checkpoint_is_skipped_with_warning(reference, tmp_path):
    out = tmp_path / "run"
    _train(out, "steps=4", "checkpoint_every=2")
    # Truncate every data file of checkpoint 4's train state.
    state_files = [p for p in (out / "checkpoints" / "4" / "state").rglob("*")
                   if p.is_file() and p.stat().st_size > 0 and "/d/" in str(p)]
    assert state_files
    for p in state_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    proc = _train(out, "steps=6", "checkpoint_every=2")
    assert "checkpoint 4" in proc.stderr and "cannot be restored" in proc.stderr
    assert "resumed from checkpoint 2" in proc.stderr
    assert (out / "checkpoints_corrupt").exists()
    got = _losses(out)
    for step in (3, 4, 5, 6):
        assert got[step][-1] == reference[step][0], step


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr=1e30 makes the parameters ~1e30 after step 1, so step 2's attention overflows.
    proc = _train(tmp_path, "steps=5", "checkpoint_every=1", "lr=1e30", "warmup_steps=0",
                  "clip_norm=0", "weight_decay=0", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [1]
    import depthjax as dj
    assert not (tmp_path / "model").exists()
    del dj


def test_nonfinite_steps_can_be_skipped(tmp_path):
    _train(tmp_path, "steps=4", "checkpoint_every=4", "lr=1e30", "warmup_steps=0",
           "clip_norm=0", "weight_decay=0", "nan_policy=skip")
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["loss"] is not None and all(r["loss"] is None for r in rows[1:])
    import depthjax as dj
    model = dj.load(tmp_path / "model")
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(model.params))


def test_sharded_2x2x2_mesh_matches_one_device(reference, tmp_path):
    _train(tmp_path, "steps=6", "checkpoint_every=6", "mesh.data=2", "mesh.fsdp=2",
           "mesh.tensor=2", devices=8)
    got = _losses(tmp_path)
    for step in reference:
        np.testing.assert_allclose(got[step][0], reference[step][0], rtol=2e-3)


def test_tensorboard_events_are_valid_tfrecords(tmp_path):
    from depthjax.train.logs import crc32c
    assert crc32c(b"123456789") == 0xE3069283          # RFC 3720 check value
    assert crc32c(bytes(32)) == 0x8A9136AA              # RFC 3720 B.4: 32 bytes of zeros
    _train(tmp_path, "steps=2", "checkpoint_every=2", "tensorboard=true")
    (events,) = (tmp_path / "tensorboard").iterdir()
    raw, records, pos = events.read_bytes(), [], 0
    while pos < len(raw):
        (n,) = struct.unpack("<Q", raw[pos:pos + 8])
        records.append(raw[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
    assert len(records) == 3 and b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and b"tokens_per_s" in records[2]
