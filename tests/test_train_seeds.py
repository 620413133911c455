"""Seeds as an axis (`depthjax train seeds=N`): a vmapped multi-seed run equals a separate
run per seed (losses, eval losses, final parameters), a killed one resumes exactly like an
uninterrupted one, and the combinations it does not support are refused by name."""

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax.train import TrainConfigError, parse
from tests.test_train import _records, _run_record, _train

# On top of test_train's TINY (seed=3): seeds 3 and 4. Six steps, so that the resume test
# can kill the run in checkpoint 4's save and go on from checkpoint 2. One data shard per
# seed: grain's packing of 4 one-row shards took most of a run's CPU time.
KEYS = ["steps=6", "checkpoint_every=2", "eval_every=3", "eval_batches=1", "data_shards=1"]
SEEDS = (3, 4)
# Separate runs compile the unbatched step; XLA may fuse the batched one differently, so
# they agree to float32 rounding (on the 2-core CPU here they came out bit-identical).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    _train(out, *KEYS, f"seeds={len(SEEDS)}")
    return out


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    runs = {}
    for seed in SEEDS:
        runs[seed] = tmp_path_factory.mktemp(f"seed{seed}")
        _train(runs[seed], *KEYS, f"seed={seed}")
    return runs


def test_each_seed_equals_its_own_run(stacked, separate):
    got = _records(stacked)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for seed, run in separate.items():
        alone = _records(run)
        for name in ("loss", "grad_norm", "eval_loss"):
            want = [r.get(name) for r in alone]
            have = [r.get(f"{name}/seed-{seed}") for r in got]
            assert [w is None for w in want] == [h is None for h in have], name
            np.testing.assert_allclose(
                [h for h in have if h is not None],
                [w for w in want if w is not None],
                rtol=RTOL,
                err_msg=f"{name} of seed {seed}",
            )
        mine, theirs = dj.load(stacked / "models" / f"seed-{seed}"), dj.load(run / "model")
        np.testing.assert_array_equal(mine.program.block, theirs.program.block)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
            mine.params,
            theirs.params,
        )
    for r in got:  # the unsuffixed value is the mean over the seeds
        for name in ("loss", "eval_loss"):
            if name in r:
                assert r[name] == pytest.approx(np.mean([r[f"{name}/seed-{s}"] for s in SEEDS]))
    assert not (stacked / "model").exists()
    # the seeds differ (a run that ignored `seed` would pass the checks above for seed 3 only)
    assert len({_records(run)[-1]["loss"] for run in separate.values()}) == len(SEEDS)


def test_seed_streams_are_single_runs_streams_and_restore_from_one_state():
    from depthjax.train import data

    docs, tok = data.documents("stdlib", "train"), data.ByteTokenizer()
    kw = dict(seq_len=16, batch_size=4, n_shards=2, shards=[0, 1], shuffle_window=8)
    both = data.SeedBatches(docs, tok, seeds=[3, 4], **kw)
    next(both)
    state = json.loads(json.dumps(both.get_state()))  # as a checkpoint stores it
    assert sorted(state) == ["3/0", "3/1", "4/0", "4/1"]
    after = [next(both) for _ in range(2)]
    resumed = data.SeedBatches(docs, tok, seeds=[3, 4], **kw)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(2)]
    for i, seed in enumerate((3, 4)):
        alone = data.ShardedBatches(docs, tok, seed=seed, **kw)
        next(alone)
        for got, back in zip(after, again):
            want = next(alone)
            for shard in (0, 1):
                for key in data.BATCH_KEYS:
                    np.testing.assert_array_equal(got[i][shard][key], want[shard][key])
                    np.testing.assert_array_equal(back[i][shard][key], want[shard][key])
    assert not np.array_equal(after[0][0][0]["inputs"], after[0][1][0]["inputs"])
    one = data.SeedBatches(docs, tok, seeds=[3], **kw)  # one seed: a single run's format
    assert sorted(one.get_state()) == ["0", "1"]


@pytest.mark.slow  # the data states are checked above; this is the whole run, killed
def test_a_killed_multi_seed_run_resumes_exactly(stacked, tmp_path):
    out = tmp_path / "run"
    keys = [*KEYS, f"seeds={len(SEEDS)}"]
    proc = _train(out, *keys, env={"DEPTHJAX_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    proc = _train(out, *keys)
    assert "resumed from checkpoint 2" in proc.stderr
    # the stacked state and every seed's data stream came back: the same record, bit for bit
    assert _run_record(out) == _run_record(stacked)
    for seed in SEEDS:
        a, b = (
            dj.load(out / "models" / f"seed-{seed}"),
            dj.load(stacked / "models" / f"seed-{seed}"),
        )
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    data = json.loads(Path(out, "checkpoints", "6", "data", "metadata").read_text())
    assert sorted({key.split("/")[0] for key in data}) == [str(s) for s in SEEDS]


def test_unsupported_seed_combinations_are_refused_by_name():
    with pytest.raises(TrainConfigError, match=r"seeds=2 with layer_dropout=0.1.*not per seed"):
        parse(["seeds=2", "layer_dropout=0.1"])
    with pytest.raises(TrainConfigError, match="seeds must be >= 1"):
        parse(["seeds=0"])
    parse(["seeds=1", "layer_dropout=0.1"])  # one seed: layer dropout as before


def test_resuming_with_other_seeds_is_refused():
    from depthjax.train import run_dir

    record = lambda seeds: run_dir.describe({}, {}, parse([f"seeds={seeds}"]).to_dict())
    refused, _ = run_dir.differences(record(3), record(2))
    assert refused == ["seeds: 3 -> 2"]


def test_memory_counts_every_seed_and_suggests_fewer():
    from depthjax.core import sharding as shd
    from depthjax.train import memory

    tc = parse(["model=llama-tiny", "batch_size=64"])
    cfg, mesh = tc.model_config(), shd.make_mesh(-1, 1, 1)
    kw = dict(depth=cfg.n_layers, n_params=10**6, n_trainable=10**6, mesh=mesh)
    one = memory.estimate(cfg, tc, **kw)
    four = memory.estimate(cfg, parse(["model=llama-tiny", "batch_size=64", "seeds=4"]), **kw)
    assert four == pytest.approx({k: 4 * v for k, v in one.items()})
    # a seed count whose stack cannot fit, where one seed does
    have, _ = memory.device_memory()
    seeds = int(have // one["total"]) + 1
    memory.check_fits(cfg, tc, **kw)
    many = parse(["model=llama-tiny", "batch_size=64", f"seeds={seeds}"])
    with pytest.raises(memory.DoesNotFit, match=rf"{seeds} seeds in one program.*fewer seeds"):
        memory.check_fits(cfg, many, **kw)
