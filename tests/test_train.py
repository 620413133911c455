"""Training runs: resume after kill -9 (also mid-save) is bit-exact and leaves metrics.jsonl
and TensorBoard as an uninterrupted run's; checkpoints are sealed and bad ones set aside
with their reason; a run directory belongs to one run and one writer; NaN handling, a
2x2x2 mesh matches one device; TensorBoard's own reader reads the events."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=llama-tiny",
    "model.n_layers=2",
    "batch_size=4",
    "seq_len=32",
    "seed=3",
    "warmup_steps=2",
    "lr=3e-3",
    "log_every=1",
    "shuffle_window=16",
    "tensorboard=false",
]


# Subprocess runs share a persistent compilation cache: compiling dominates a tiny run.
_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": str(
        Path(__import__("tempfile").gettempdir()) / "depthjax-test-jax-cache"
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _env(devices=1, extra=None):
    return {
        **os.environ,
        **_CACHE,
        **(extra or {}),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
    }


def _train(out, *keys, env=None, devices=1, check=True):
    """`depthjax train` in a subprocess (fresh JAX, so the device count can be set)."""
    env = _env(devices, env)
    flags = [k for k in keys if k.startswith("--")]
    keys = [k for k in keys if not k.startswith("--")]
    proc = subprocess.run(
        [sys.executable, "-m", "depthjax.cli", "train", "--out", str(out), *flags, *TINY, *keys],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _records(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, list[float]]:
    """step -> every loss logged for it (a resumed run must log each step once)."""
    seen: dict[int, list[float]] = {}
    for r in _records(out):
        seen.setdefault(r["step"], []).append(r["loss"])
    return seen


_TIMING = {"time", "tokens_per_s", "step_time_s", "mfu"}  # may differ between runs


def _run_record(out) -> list[dict]:
    """metrics.jsonl without the timing fields: what an interruption must not change."""
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in _records(out)]


def _tensorboard(out) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's own reader sees the run's event files."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(Path(out, "tensorboard")))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected_tensorboard(out) -> dict[str, list[tuple[int, float]]]:
    """The scalars of metrics.jsonl as float32 (TensorBoard's simple_value)."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for r in _records(out):
        for k, v in r.items():
            if k not in ("step", "time") and isinstance(v, (int, float)):
                tags.setdefault(k, []).append((r["step"], float(np.float32(v))))
    return tags


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _train(out, "steps=6", "checkpoint_every=2", "tensorboard=true")
    return out


@pytest.fixture(scope="module")
def reference(reference_run):
    return _losses(reference_run)


def test_metrics_have_required_fields(reference, tmp_path_factory):
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    first = reference[1][0]
    assert abs(first - np.log(256)) < 0.3  # untrained byte model: about uniform
    assert min(reference[6]) < first  # and it learns


def test_kill9_then_resume_is_bit_exact(reference_run, tmp_path):
    out = tmp_path / "run"
    env = _env()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "depthjax.cli",
            "train",
            "--out",
            str(out),
            *TINY,
            "steps=6",
            "checkpoint_every=2",
            "log_every=1",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
    # Every step once, each value bit-identical: as if the run had never stopped.
    assert _run_record(out) == _run_record(reference_run)


@pytest.mark.slow
def test_kill9_during_a_save_resumes_from_previous_checkpoint(reference_run, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        out,
        "steps=6",
        "checkpoint_every=2",
        "tensorboard=true",
        env={"DEPTHJAX_TEST_KILL_IN_SAVE": "4"},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4]  # logged past checkpoint 2
    assert _tensorboard(out)["loss"]  # events of the killed attempt, to be superseded
    proc = _train(out, "steps=6", "checkpoint_every=2", "tensorboard=true")
    assert "resumed from checkpoint 2" in proc.stderr
    # metrics.jsonl was cut back to step 2 before the run went on: each step once, and
    # TensorBoard (two event files now) reads exactly what metrics.jsonl says.
    assert _run_record(out) == _run_record(reference_run)
    assert len(list((out / "tensorboard").iterdir())) == 2
    assert _tensorboard(out) == _expected_tensorboard(out)


def test_tensorboard_reads_the_scalars_back(reference_run):
    tb = _tensorboard(reference_run)
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"} <= set(tb)
    assert tb == _expected_tensorboard(reference_run)
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4, 5, 6]


def test_cut_jsonl_keeps_whole_records_up_to_the_step(tmp_path):
    from depthjax.train.logs import cut_jsonl

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]
    path.write_text("".join(lines) + '{"step": 5, "lo')  # torn by a kill
    assert [r["step"] for r in cut_jsonl(path, 2)] == [1, 2]
    assert path.read_text() == "".join(lines[:2])
    assert not list(tmp_path.glob(".*tmp*"))  # replaced, nothing beside
    assert cut_jsonl(tmp_path / "absent.jsonl", 3) == []


def _state_files(step_dir):
    return sorted(
        p
        for p in (step_dir / "state").rglob("*")
        if p.is_file() and p.stat().st_size > 0 and "/d/" in str(p)
    )


@pytest.mark.slow
def test_bad_checkpoints_are_set_aside_with_their_reason(reference, tmp_path):
    """Checkpoint 6 unsealed (killed between orbax's commit and the seal), one bit flipped
    in checkpoint 4: both are set aside with their reason, 2 is used, the run is exact."""
    out = tmp_path / "run"
    proc = _train(
        out,
        "steps=6",
        "checkpoint_every=2",
        env={"DEPTHJAX_TEST_KILL_BEFORE_SEAL": "6"},
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    victim = _state_files(out / "checkpoints" / "4")[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    victim.write_bytes(bytes(raw))
    (out / ".model.tmp-k1ll3d").mkdir()  # a final save killed by an older depthjax
    proc = _train(out, "steps=6", "checkpoint_every=2")
    assert not (out / ".model.tmp-k1ll3d").exists()
    assert "checkpoint 6" in proc.stderr and "no integrity record" in proc.stderr
    assert "checkpoint 4" in proc.stderr and "does not match its SHA-256" in proc.stderr
    assert "resumed from checkpoint 2" in proc.stderr
    reasons = {
        p.parent.name.split("-")[0]: p.read_text()
        for p in (out / "checkpoints_corrupt").glob("*/REASON.txt")
    }
    assert sorted(reasons) == ["4", "6"] and "SHA-256" in reasons["4"]
    got = _losses(out)
    for step in (3, 4, 5, 6):
        assert got[step][-1] == reference[step][0], step
    # The run directory is this run's: another model, rope_theta or seed is refused,
    # naming every differing key, and nothing is moved or deleted.
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = _train(out, "steps=6", "model.n_layers=3", "model.rope_theta=500000", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.n_layers: 2 -> 3" in proc.stderr and "model.rope_theta" in proc.stderr
    assert "--fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    # --fresh moves the old run aside (whole) and starts over.
    proc = _train(out, "steps=1", "seed=4", "--fresh")
    (aside,) = tmp_path.glob("run.prev-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
    assert sorted(_losses(out)) == [1]
    assert json.loads((out / "run.json").read_text())["train"]["seed"] == 4


def test_every_bit_flip_in_a_training_checkpoint_is_detected(reference_run, tmp_path):
    from depthjax.files import integrity

    ck = shutil.copytree(reference_run / "checkpoints" / "6", tmp_path / "6")
    integrity.verify(ck)
    files = sorted(p for p in ck.rglob("*") if p.is_file())
    assert len(files) > 10 and any(p.name == integrity.RECORD for p in files)
    rng = np.random.default_rng(1)
    for trial in range(3 * len(files)):
        path = files[trial % len(files)]
        raw = path.read_bytes()
        bit = int(rng.integers(len(raw) * 8))
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << bit % 8
        path.write_bytes(bytes(flipped))
        with pytest.raises(integrity.IntegrityError):
            integrity.verify(ck)
        path.write_bytes(raw[: len(raw) // 2])  # truncation
        with pytest.raises(integrity.IntegrityError):
            integrity.verify(ck)
        path.write_bytes(raw)
    (ck / "state" / "stray").write_bytes(b"")
    with pytest.raises(integrity.IntegrityError, match="stray is not part of the checkpoint"):
        integrity.verify(ck)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "depthjax.cli",
            "train",
            "--out",
            str(out),
            *TINY,
            "steps=100000",
            "checkpoint_every=100000",
        ],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "run.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = _train(out, "steps=2", check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by pid {first.pid}" in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    third = _train(out, "steps=2")
    assert f"took over the stale lock of pid {first.pid}" in third.stderr
    assert not (out / "run.lock").exists()


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # lr=1e30 makes the parameters ~1e30 after step 1, so step 2's attention overflows.
    proc = _train(
        tmp_path,
        "steps=5",
        "checkpoint_every=1",
        "lr=1e30",
        "warmup_steps=0",
        "clip_norm=0",
        "weight_decay=0",
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss or gradient at step 2" in proc.stderr
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [1]
    import depthjax as dj

    assert not (tmp_path / "model").exists()
    del dj


@pytest.mark.slow
def test_nonfinite_steps_can_be_skipped(tmp_path):
    _train(
        tmp_path,
        "steps=4",
        "checkpoint_every=4",
        "lr=1e30",
        "warmup_steps=0",
        "clip_norm=0",
        "weight_decay=0",
        "nan_policy=skip",
    )
    rows = _records(tmp_path)
    assert [r["skipped"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["loss"] is not None and all(r["loss"] is None for r in rows[1:])
    import depthjax as dj

    model = dj.load(tmp_path / "model")
    leaves = __import__("jax").tree.leaves(model.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


@pytest.mark.slow
def test_sharded_2x2x2_mesh_matches_one_device(reference, tmp_path):
    _train(
        tmp_path,
        "steps=6",
        "checkpoint_every=6",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        devices=8,
    )
    got = _losses(tmp_path)
    for step in reference:
        np.testing.assert_allclose(got[step][0], reference[step][0], rtol=2e-3)
