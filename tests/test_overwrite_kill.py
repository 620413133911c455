"""`dj.hf.save(..., overwrite=True)` stages and swaps: a kill -9 at any moment of an
overwrite leaves the directory holding the complete old or the complete new checkpoint.

A child process overwrites one directory with model A and model B in turn, as fast as it
can; it is killed at a random moment, many times, and each time the directory must load
and hold exactly A's or B's parameters (never a mix, never nothing).
"""

import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import depthjax as dj
from tests.test_train import ROOT, _env

pytestmark = pytest.mark.slow
CFG = dict(n_layers=2, d_model=32)
TRIALS = 12

CHILD = """
import sys
import jax
import depthjax as dj

cfg = dj.configs.get("llama-tiny", n_layers=2, d_model=32)
a, b = (dj.init(cfg, jax.random.key(seed)) for seed in (0, 1))
path = sys.argv[1]
dj.hf.save(b, path, overwrite=True)  # warm up (and compile) before saying ready
print("ready", flush=True)
while True:
    for m in (a, b):
        dj.hf.save(m, path, overwrite=True)
"""


def _fingerprint(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(params)])


def test_kill9_during_overwrite_leaves_old_or_new(tmp_path):
    cfg = dj.configs.get("llama-tiny", **CFG)
    a, b = (dj.init(cfg, jax.random.key(seed)) for seed in (0, 1))
    want = {"a": _fingerprint(a.params), "b": _fingerprint(b.params)}
    path = tmp_path / "ck"
    dj.hf.save(a, str(path))
    (path / "README.md").write_text("kept\n")
    rng, seen = random.Random(0), set()
    for trial in range(TRIALS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            env=_env(1),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait()
        got = _fingerprint(dj.hf.load(str(path)).params)
        which = [k for k, v in want.items() if v.shape == got.shape and np.array_equal(v, got)]
        assert which, f"trial {trial}: the directory holds neither the old nor the new model"
        assert (path / "README.md").read_text() == "kept\n", f"trial {trial}"
        seen.add(which[0])
    # The kills landed in different saves; the leftovers of a killed save are gone after
    # the next overwrite.
    assert seen == {"a", "b"}
    dj.hf.save(a, str(path), overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")]
