"""Run directories: which config changes a rerun may make, the lock (pid, host,
heartbeat, stale takeover) and --fresh (moves the old run aside, never deletes)."""

import json
import os
import socket
import subprocess
import time

import pytest

from depthjax.train import run_dir
from depthjax.train.config import TrainConfig


def _record(**train):
    model = {"d_model": 64, "n_layers": 2, "rope_theta": 10000.0, "dtype": "float32"}
    program = {"block": [0, 1], "attn": [1.0, 1.0], "mlp": [1.0, 1.0], "parallel": [False, False]}
    base = json.loads(json.dumps(TrainConfig().to_dict()))
    return run_dir.describe(model, program, {**base, **train})


def _changed(stored, now, **kw):
    refused, warned = run_dir.differences(stored, now, **kw)
    return [r.split(":")[0] for r in refused], [w.split(":")[0] for w in warned]


def test_which_changes_a_resume_may_make():
    a = _record()
    assert _changed(a, _record()) == ([], [])
    # What the run is: refused, every key named.
    b = _record(seed=1, batch_size=32, data="files")
    b["model"] = {**a["model"], "n_layers": 3, "rope_theta": 5e5}
    b["program"] = {**a["program"], "block": [1, 0]}
    refused, warned = _changed(a, b)
    assert (
        refused == ["program", "model.n_layers", "model.rope_theta", "batch_size", "data", "seed"]
        and warned == []
    )
    # How it continues: accepted with a warning. Bookkeeping: silently.
    c = _record(
        steps=500,
        lr=1e-3,
        log_every=7,
        checkpoint_every=3,
        mesh={"data": 2, "fsdp": 2, "tensor": 1},
    )
    c["model"] = {**a["model"], "dtype": "bfloat16"}
    assert _changed(a, c) == ([], ["model.dtype", "lr", "steps"])
    # Clipping switched on or off changes the optimizer state's structure: refused.
    assert _changed(a, _record(clip_norm=0.0))[0] == ["clip_norm"]
    assert _changed(a, _record(clip_norm=0.5)) == ([], ["clip_norm"])
    # A key the stored record lacks (a later depthjax added it) is unchanged at its default.
    old = _record()
    del old["train"]["heartbeat_timeout"], old["train"]["nan_policy"]
    defaults = run_dir.flat(json.loads(json.dumps(TrainConfig().to_dict())))
    assert _changed(old, _record(), defaults=defaults) == ([], [])
    assert _changed(old, _record(nan_policy="skip"), defaults=defaults) == ([], ["nan_policy"])
    del old["train"]["data_shards"]  # ...but never an identity key
    assert _changed(old, _record(), defaults=defaults)[0] == ["data_shards"]


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
    lock = run_dir.RunLock(tmp_path).acquire()
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_dir.RunInUse, match=f"in use by pid {os.getpid()} on"):
        run_dir.RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    # A dead process on this host: taken over at once.
    pid = _dead_pid()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    lock = run_dir.RunLock(tmp_path).acquire()
    assert lock.took_over == (
        f"took over the stale lock of pid {pid} on {socket.gethostname()} "
        f"(pid {pid} is no longer running)"
    )
    lock.release()
    # Another host's process (its pid cannot be checked): stale once its heartbeat is old.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(run_dir.RunInUse, match="pid 1 on elsewhere"):
        run_dir.RunLock(tmp_path).acquire()
    old = time.time() - run_dir.STALE_AFTER_S - 10
    os.utime(tmp_path / "run.lock", (old, old))
    lock = run_dir.RunLock(tmp_path).acquire()
    assert "no heartbeat for" in lock.took_over
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock debris


def test_move_aside_keeps_everything(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "run.lock").write_text("{}")
    aside = run_dir.move_aside(run)
    assert aside.name.startswith("run.prev-")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    assert run_dir.move_aside(run) is None  # nothing left to move
