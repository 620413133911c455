"""The README's main job in its quick mode: trains, scores, prunes, recovers, reports."""

import json

import numpy as np
import pytest

from depthjax import cli
from depthjax.files import corpus


@pytest.mark.slow
def test_demo_quick_writes_a_consistent_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    for name in ("report.json", "report.md", "profiles.png", "removal_curves.png", "recovery.png"):
        assert (out / name).stat().st_size > 500, name
    report = json.loads((out / "report.json").read_text())
    assert report["corpus"] == corpus.describe()  # the corpus named by its digest
    assert report["corpus"]["sha256"][:16] in (out / "report.md").read_text()
    depth, n = report["model"]["depth"], report["n_blocks"]
    assert n == max(1, depth // 4)
    full = report["full_loss"]
    assert np.isfinite(full) and full < np.log(256)  # it learned something
    expected = {
        "block_influence",
        "angular_distance",
        "relative_contribution_block",
        "ablation_block",
        "shapley_block",
    }
    assert set(report["pruning"]["block"]) == expected
    assert set(report["pruning"]["attn"]) == {"relative_contribution_attn", "ablation_attn"}
    for unit in ("block", "attn"):
        for row in report["pruning"][unit].values():
            assert len(row["removed"]) == n
            assert np.isfinite([row["pruned"], row["bias"], row["linear"]]).all()
    # The random control: every subset of n blocks (4 choose 1 here), each measured alone
    # as the metrics' pruned rows are.
    for unit in ("block", "attn"):
        control = report["random"][unit]
        assert control["exhaustive"] and sorted(control["subsets"]) == [[i] for i in range(depth)]
        values = np.array(control["values"])
        assert control["mean"] == pytest.approx(values.mean())
        assert control["std"] == pytest.approx(values.std(ddof=1))
        assert control["min"] == values.min() and control["max"] == values.max()
    by_ablation = report["pruning"]["block"]["ablation_block"]
    i = report["random"]["block"]["subsets"].index(by_ablation["removed"])
    assert report["random"]["block"]["values"][i] == pytest.approx(by_ablation["pruned"], rel=1e-5)
    for curve in report["removal_curves"].values():  # k = 0 is the full model
        assert len(curve) == depth and abs(curve[0] - full) < 1e-4
    text = (out / "report.md").read_text()
    assert "Pruning" in text and "![profiles](profiles.png)" in text
    assert text.count("| random (control) | all 4 subsets |") == 2
    printed = capsys.readouterr().out
    assert "validation loss, full model" in printed and "random (control)" in printed
