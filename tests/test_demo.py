"""The README's main job in its quick mode: trains 2 seeds, scores, prunes, recovers, and
reports every figure over the seeds."""

import json

import numpy as np
import pytest

from depthjax import cli
from depthjax.files import corpus

T975_DF1 = 12.706205  # the 0.975 quantile of Student's t with 1 degree of freedom


def _interval(two_values) -> tuple[float, float]:
    """The 95% t-interval of the mean of two values, by hand."""
    x = np.asarray(two_values, np.float64)
    half = T975_DF1 * x.std(ddof=1) / np.sqrt(2)
    return x.mean() - half, x.mean() + half


def _check_run(run: dict, depth: int, n: int) -> None:
    """One seed's analysis: the same checks the one-seed demo had."""
    full = run["full_loss"]
    assert np.isfinite(full) and full < np.log(256)  # it learned something
    expected = {
        "block_influence",
        "angular_distance",
        "relative_contribution_block",
        "ablation_block",
        "shapley_block",
    }
    assert set(run["pruning"]["block"]) == expected
    assert set(run["pruning"]["attn"]) == {"relative_contribution_attn", "ablation_attn"}
    for unit in ("block", "attn"):
        for row in run["pruning"][unit].values():
            assert len(row["removed"]) == n
            assert np.isfinite([row["pruned"], row["bias"], row["linear"]]).all()
    # The random control: every subset of n blocks (4 choose 1 here), each measured alone
    # as the metrics' pruned rows are.
    for unit in ("block", "attn"):
        control = run["random"][unit]
        assert control["exhaustive"] and sorted(control["subsets"]) == [[i] for i in range(depth)]
        values = np.array(control["values"])
        assert control["mean"] == pytest.approx(values.mean())
        assert control["std"] == pytest.approx(values.std(ddof=1))
        assert control["min"] == values.min() and control["max"] == values.max()
    by_ablation = run["pruning"]["block"]["ablation_block"]
    i = run["random"]["block"]["subsets"].index(by_ablation["removed"])
    assert run["random"]["block"]["values"][i] == pytest.approx(by_ablation["pruned"], rel=1e-5)
    for curve in run["removal_curves"].values():  # k = 0 is the full model
        assert len(curve) == depth and abs(curve[0] - full) < 1e-4


@pytest.mark.slow
def test_demo_quick_writes_a_consistent_report_over_seeds(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    for name in ("report.json", "report.md", "profiles.png", "removal_curves.png", "recovery.png"):
        assert (out / name).stat().st_size > 500, name
    report = json.loads((out / "report.json").read_text())
    assert report["corpus"] == corpus.describe()  # the corpus named by its digest
    text = (out / "report.md").read_text()
    assert report["corpus"]["sha256"][:16] in text
    depth, n = report["model"]["depth"], report["n_blocks"]
    assert n == max(1, depth // 4)
    assert report["train"]["seeds"] == [0, 1]
    runs = report["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        _check_run(run, depth, n)
    full = [r["full_loss"] for r in runs]
    assert full[0] != full[1]  # two seeds train two different models

    # The figures over seeds are the per-seed figures side by side ...
    by = report["over_seeds"]
    assert by["full_loss"] == full
    for unit in ("block", "attn"):
        assert by[unit]["random"] == [r["random"][unit]["mean"] for r in runs]
        for name, row in by[unit]["metrics"].items():
            for key in ("removed", "pruned", "bias", "linear"):
                assert row[key] == [r["pruning"][unit][name][key] for r in runs]
    # ... reported as mean ± std [95% t-interval], computed here by hand.
    (lo, hi), mean, std = _interval(full), np.mean(full), np.std(full, ddof=1)
    assert f"{mean:.4f} ± {std:.4f} [{lo:.4f}, {hi:.4f}] (n=2)" in text
    d = np.subtract(by["block"]["metrics"]["ablation_block"]["pruned"], by["block"]["random"])
    lo, hi = _interval(d)
    verdict = "not resolved" if lo <= 0 <= hi else ("below" if hi < 0 else "above")
    assert f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}" in text
    assert "Pruning" in text and "![profiles](profiles.png)" in text
    assert text.count("| random (control) | all 4 subsets per seed |") == 2
    printed = capsys.readouterr().out
    assert "validation loss, full model" in printed and "random (control)" in printed


def test_demo_refuses_zero_seeds(tmp_path):
    from depthjax.cli.demo import run_demo

    with pytest.raises(ValueError, match="at least one seed"):
        run_demo(tmp_path, quick=True, seeds=0)


def test_demo_cli_names_a_bad_seed_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--seeds", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err
