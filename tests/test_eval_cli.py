"""`depthjax eval`, and `depthjax score` / `prune` with --task, --data and encoders."""

import json

import jax
import numpy as np
import pytest

import depthjax as dj
from depthjax import cli

MC = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys", " re", " json"], "label": 2},
]
TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 8
SMALL = ["--batches", "1", "--batch-size", "2", "--seq-len", "32", "--shapley-permutations", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(2))
    dj.save(model, tmp / "ck")
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp / "gen.jsonl").write_text(json.dumps({"context": "abc", "target": "d"}) + "\n")
    (tmp / "docs").mkdir()
    (tmp / "docs" / "a.txt").write_text(TEXT)
    (tmp / "docs" / "b.jsonl").write_text(json.dumps({"text": TEXT[::-1]}) + "\n")
    return tmp, model


@pytest.mark.slow
def test_eval_command_matches_dj_eval(files):
    tmp, model = files
    assert (
        cli.main(
            [
                "eval",
                "--model",
                str(tmp / "ck"),
                "--task",
                str(tmp / "mc.jsonl"),
                "--task",
                str(tmp / "gen.jsonl"),
                "--data",
                str(tmp / "docs"),
                "--max-new-tokens",
                "3",
                "--out",
                str(tmp / "res.json"),
            ]
        )
        == 0
    )
    res = json.loads((tmp / "res.json").read_text())
    mc = dj.eval.multiple_choice(model, MC)
    assert res["mc"]["acc"] == mc["acc"] and res["mc"]["nll"] == pytest.approx(mc["nll"])
    ppl = dj.eval.perplexity(model, tmp / "docs")
    assert res["perplexity"]["bits_per_byte"] == pytest.approx(ppl["bits_per_byte"])
    gen = dj.eval.exact_match(model, tmp / "gen.jsonl", max_new_tokens=3)
    assert res["gen"]["outputs"] == gen["outputs"]


@pytest.mark.slow
def test_score_and_prune_measure_a_task_on_user_data(files, capsys):
    tmp, model = files
    assert (
        cli.main(
            [
                "score",
                "--model",
                str(tmp / "ck"),
                "--data",
                str(tmp / "docs"),
                "--task",
                str(tmp / "mc.jsonl"),
                "--task-metric",
                "nll",
                "--out",
                str(tmp / "rep"),
                *SMALL,
            ]
        )
        == 0
    )
    rep = json.loads((tmp / "rep" / "scores.json").read_text())
    task = dj.eval.MultipleChoice(MC, metric="nll")
    want = dj.metrics.ablation(model, None, unit="block", measure=task)
    np.testing.assert_allclose(rep["scores"]["ablation_block"]["values"], want.values, atol=1e-6)
    assert rep["measure"] == "1 - nll (mc)" and len(rep["removal_curves"]["ablation_block"]) == 4
    assert "documents" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "prune",
                "--model",
                str(tmp / "ck"),
                "--metric",
                "ablation",
                "--n",
                "1",
                "--task",
                str(tmp / "mc.jsonl"),
                "--out",
                str(tmp / "pruned"),
                *SMALL,
            ]
        )
        == 0
    )
    assert dj.load(tmp / "pruned").depth == 3
    assert "1 - acc (mc): full" in capsys.readouterr().out


def _sentence_transformers_dir(tmp_path):
    bert = dj.init(dj.configs.get("bert-tiny"), jax.random.key(0))
    dj.hf.save(bert, tmp_path / "st")
    (tmp_path / "st" / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    return tmp_path / "st"


@pytest.mark.slow
def test_score_on_a_sentence_transformers_directory(tmp_path):
    _sentence_transformers_dir(tmp_path)
    assert (
        cli.main(["score", "--model", str(tmp_path / "st"), "--out", str(tmp_path / "rep"), *SMALL])
        == 0
    )
    rep = json.loads((tmp_path / "rep" / "scores.json").read_text())
    assert rep["scores"]["ablation_block"]["name"] == "ablation_representation"
    assert "logit_lens" not in rep["scores"] and rep["measure"] == "1 - cosine to the full model"
    assert rep["removal_curves"]["ablation_block"][0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_encoder_directory_whose_tokenizer_truncates_and_pads(tmp_path, capsys):
    """all-MiniLM ships a tokenizer.json with truncation (max_length 128) and padding:
    score, prune and eval must still see whole documents."""
    from tests.conftest import char_tokenizer

    st = _sentence_transformers_dir(tmp_path)
    char_tokenizer(st / "tokenizer.json", truncate=8, pad=8)
    (tmp_path / "any.txt").write_text("a sentence that is longer than eight tokens. " * 40)
    data = ["--data", str(tmp_path / "any.txt"), "--batches", "1", "--batch-size", "2"]
    data += ["--seq-len", "32"]
    assert cli.main(["score", "--model", str(st), "--out", str(tmp_path / "rep"), *data]) == 0
    prune = ["prune", "--model", str(st), "--n", "1", "--out", str(tmp_path / "p"), *data]
    assert cli.main(prune) == 0
    assert dj.load(tmp_path / "p").depth == dj.configs.get("bert-tiny").n_layers - 1
    # eval has no encoder measure on the command line: refused by name, not for the length
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(st), "--data", str(tmp_path / "any.txt")]) == 2
    assert "bidirectional bert encoder" in capsys.readouterr().err


def test_bad_task_file_is_a_one_line_error(files, capsys):
    tmp, _ = files
    (tmp / "bad.jsonl").write_text(
        json.dumps({"context": "x", "choices": ["a", "b"], "label": 5}) + "\n"
    )
    assert cli.main(["eval", "--model", str(tmp / "ck"), "--task", str(tmp / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: label 5 is not an index" in capsys.readouterr().err
