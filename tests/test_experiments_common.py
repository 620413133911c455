"""experiments/common.py's statistics against independent references (the t distribution's
CDF integrated numerically, published quantiles, coverage by simulation), and its per-seed
model cache (which seeds it trains, in which runs, and where it keeps them)."""

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import depthjax as dj

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import common  # noqa: E402


def t_cdf(t: float, df: int) -> float:
    """Student's t CDF by integrating its density (Simpson's rule on 200001 points)."""
    x = np.linspace(0.0, t, 200_001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
    h = x[1] - x[0]
    return 0.5 + h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 60, 120, 1000])
def test_t_quantile_is_the_975_point_of_the_t_distribution(df):
    assert t_cdf(common.t975(df), df) == pytest.approx(0.975, abs=2e-7)


def test_t_quantile_matches_published_values():
    published = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045, 60: 2.000, 120: 1.980}
    for df, t in published.items():
        assert common.t975(df) == pytest.approx(t, abs=5e-4)
    with pytest.raises(ValueError, match="df >= 1"):
        common.t975(0)


def test_spread_and_its_format():
    mean, std, (lo, hi) = common.spread([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n), std = 1
    assert (mean, std) == (2.0, 1.0) and (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert common.fmt([1.0, 2.0, 3.0], digits=2) == "2.00 ± 1.00 [-0.48, 4.48] (n=3)"
    assert common.fmt([2.5]) == "2.5000 (n=1, no spread)"
    for bad in ([1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="at least 2 finite values"):
            common.spread(bad)


def test_the_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(1.5, 0.3, (4000, 3))
    covered = [lo <= 1.5 <= hi for _, _, (lo, hi) in map(common.spread, samples)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)  # 3.5 binomial std


def test_separated_pairs_seeds_and_compares_intervals_otherwise():
    seed_effect = np.array([0.0, 0.3, -0.3])  # shared by both settings of a seed
    a, b = 2.0 + seed_effect, 2.05 + seed_effect + np.array([0.001, -0.001, 0.0])
    assert common.separated(a, b)  # every seed: b is 0.05 above a
    assert not common.separated(a, b, paired=False)  # the intervals overlap
    assert not common.separated(a, a + np.array([0.01, -0.01, 0.002]))
    assert common.separated([1.0, 1.1, 1.05], [2.0, 2.1, 2.05], paired=False)
    with pytest.raises(ValueError, match="one value per seed"):
        common.separated([1.0, 2.0], [1.0, 2.0, 3.0])


def test_compare_states_the_paired_verdict_and_mean_bands_the_spread():
    seed_effect = np.array([0.0, 0.3, -0.3])
    a, b = 2.0 + seed_effect, 2.05 + seed_effect + np.array([0.001, -0.001, 0.0])
    line = common.compare(a, b, "A", "B", digits=3)
    assert line.startswith("A minus B: -0.050 ± 0.001 [") and line.endswith("A has the lower loss.")
    assert common.compare(b, a, "B", "A", what="x").endswith("A has the lower x.")
    noisy = a + np.array([0.01, -0.01, 0.002])
    assert common.compare(noisy, a, "A", "B").endswith("not resolved at this scale.")
    assert common.compare([1.0], [2.0], "A", "B").endswith("not resolved at this scale.")
    means, bands = common.mean_bands({"c": [[1.0, 2.0], [3.0, 2.0]]})
    np.testing.assert_allclose(means["c"], [2.0, 2.0])
    np.testing.assert_allclose(bands["c"], [[2.0 - math.sqrt(2), 2.0], [2.0 + math.sqrt(2), 2.0]])


def _args(tmp_path, **kw):
    p = common.parser("test", "")
    return p.parse_args(
        ["--cache", str(tmp_path), "--layers", "1", "--d-model", "16", "--steps", "2"]
        + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    )


@pytest.fixture
def fake_training(monkeypatch):
    """train_run replaced by an init per seed, laid out as depthjax.train.run lays out its
    models; records (seed, seeds) of every run and checks that its config is configs[0]
    with only those changed. A True in `refuse` plays an out-of-memory stack
    (memory.DoesNotFit)."""
    calls, refuse, configs = [], [], []

    def train_run(run_dir, tc):
        calls.append((tc.seed, tc.seeds))
        assert tc == dataclasses.replace(configs[0], seed=tc.seed, seeds=tc.seeds)
        if refuse and tc.seeds > 1:
            raise common.DoesNotFit("needs more than a device has")
        cfg = tc.model_config()
        for s in range(tc.seed, tc.seed + tc.seeds):
            path = run_dir / ("model" if tc.seeds == 1 else f"models/seed-{s}")
            dj.save(dj.init(cfg, jax.random.key(s)), path)

    monkeypatch.setattr(common, "train_run", train_run)
    return calls, refuse, configs


def test_seeds_are_trained_in_one_run_and_cached_per_seed(tmp_path, fake_training):
    calls, _, configs = fake_training
    args = _args(tmp_path, seed=4, seeds=2)
    configs.append(common.train_config(args))
    models = common.base_models(args)
    assert calls == [(4, 2)]
    for s, model in zip((4, 5), models):  # each where a single-seed run of it is cached
        alone = common.train_config(args, seed=s)
        assert (common.cached_run_dir(args, "base", alone) / "model").is_dir()
        jax.tree.map(
            np.testing.assert_array_equal,
            model.params,
            dj.init(model.config, jax.random.key(s)).params,
        )
    common.trained_seeds(args, "base", common.train_config(args), [3, 4, 5, 7, 8])
    assert calls == [(4, 2), (3, 1), (7, 2)]  # only the missing seeds, consecutive ones together
    # a single-seed model keeps the key it had before `seeds` existed: old caches stay valid
    old = {k: v for k, v in common.train_config(args).to_dict().items() if k != "seeds"}
    digest = hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
    assert (
        common.cached_run_dir(args, "base", common.train_config(args)).name == f"base-{digest[:10]}"
    )


def test_a_stack_that_does_not_fit_is_trained_one_seed_at_a_time(tmp_path, fake_training):
    calls, refuse, configs = fake_training
    refuse.append(True)
    args = _args(tmp_path, seed=0, seeds=3)
    configs.append(common.train_config(args))
    models = common.base_models(args)
    assert calls == [(0, 3), (0, 1), (1, 1), (2, 1)]
    assert len({float(jax.tree.leaves(m.params)[0].ravel()[0]) for m in models}) == 3
