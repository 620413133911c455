"""Progress bars: silent off a terminal (as under pytest), under quiet() and DEPTHJAX_QUIET,
drawn when enabled, nested bars share one display, and drawing changes no result."""

import json
import sys

import numpy as np
import pytest

import depthjax.metrics as M
from depthjax import progress
from depthjax.cli import main
from depthjax.train.logs import RunLog

# Shapes of tests/test_metrics.py's batches, so a shared process reuses its compilations.
BATCHES = [np.random.default_rng(0).integers(0, 256, (3, 16)).astype(np.int32) for _ in range(3)]


@pytest.fixture(scope="module")
def model(llama):
    return llama


@pytest.fixture
def drawing(monkeypatch):
    """Bars drawn as on a terminal although stderr is captured (rich then prints each bar's
    final frame); quiet still silences them."""
    monkeypatch.setattr(progress, "enabled", lambda: not progress.silenced())


def test_enabled_only_on_a_terminal_and_not_under_quiet(monkeypatch):
    assert not progress.enabled()  # pytest captures stderr: no terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.enabled()
    with progress.quiet():
        assert not progress.enabled() and progress.silenced()
        with progress.quiet(False):  # an inner block cannot undo quiet
            assert not progress.enabled()
    assert progress.enabled()
    monkeypatch.setenv("DEPTHJAX_QUIET", "1")
    assert not progress.enabled() and progress.silenced()


def test_metric_sweeps_are_silent_off_a_terminal(model, capsys):
    M.ablation(model, BATCHES, unit="attn")
    M.block_influence(model, BATCHES)
    assert capsys.readouterr() == ("", "")


def test_bars_draw_when_enabled_and_change_no_result(model, capsys, drawing):
    with progress.quiet():
        plain = [M.ablation(model, BATCHES, unit="attn"), M.block_influence(model, BATCHES)]
    assert capsys.readouterr().err == ""
    drawn = [M.ablation(model, BATCHES, unit="attn"), M.block_influence(model, BATCHES)]
    err = capsys.readouterr().err
    assert "ablation attn (5 programs" in err and "trace metrics" in err and "3/3" in err
    for a, b in zip(plain, drawn):
        np.testing.assert_array_equal(a.values, b.values)


def test_nested_bars_share_one_display(capsys, drawing):
    with progress.bar("outer", total=2) as outer:
        for _ in range(2):
            assert list(progress.track(range(4), "inner")) == [0, 1, 2, 3]
            outer.advance(loss=1.5)
        outer.print("a line above the bar")
    err = capsys.readouterr().err
    assert "outer" in err and "2/2" in err and "loss 1.5" in err
    assert "a line above the bar" in err
    assert "inner" not in err  # nested rows go when they finish


def _log_run(out, records):
    log = RunLog(out, total_steps=len(records), tensorboard=False)
    log.message("starting")
    log.start(0)
    for r in records:
        log.log(r)
    log.message("done")
    log.close()
    return (out / "metrics.jsonl").read_text()


RECORDS = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 1e4 * s, "mfu": None} for s in (1, 2, 3)]


def test_training_console_plain_lines_bar_or_nothing(tmp_path, capsys, monkeypatch):
    # Off a terminal, quiet, then drawing: metrics.jsonl is the same each time.
    lines = _log_run(tmp_path / "a", RECORDS)
    err = capsys.readouterr().err  # off a terminal: one line per step
    assert "[train] step 2/3  loss 1.5000  tok/s 20,000" in err and "[train] done" in err
    with progress.quiet():
        assert _log_run(tmp_path / "b", RECORDS) == lines
    assert capsys.readouterr().err == "[train] starting\n[train] done\n"  # messages only
    monkeypatch.setattr(progress, "enabled", lambda: not progress.silenced())
    assert _log_run(tmp_path / "c", RECORDS) == lines
    err = capsys.readouterr().err  # a bar: steps, loss, tokens/s, ETA
    assert "train" in err and "3/3" in err and "loss 1.0000" in err and "eta" in err
    assert "[train] step" not in err and "[train] done" in err
    assert [json.loads(x)["step"] for x in lines.splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("command", ["demo", "train", "score", "prune"])
def test_long_commands_take_quiet(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--quiet" in capsys.readouterr().out
