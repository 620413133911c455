"""The lm-evaluation-harness adapter end to end: lm_eval's own CLI (`--model depthjax`, a
task YAML over local JSONL files via --include_path, offline) on a native checkpoint with a
slice spec and on a Hugging Face directory, checked against depthjax.eval on the same
requests. Skips without lm_eval (extra [eval]; CI installs it in its own step)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import import_lm_eval

import_lm_eval()  # skips without lm_eval; fails in CI's [eval] stage
pytestmark = pytest.mark.slow  # CI runs these in their own step, after installing [eval]

import depthjax as dj  # noqa: E402
import depthjax.depth as D  # noqa: E402

MC = [
    {"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "label": 0},
    {"context": "import os\nimport", "choices": [" sys", " résumé", " re"], "label": 2},
    {"context": "x = [1, 2, 3", "choices": ["]", ")", "] + [4]"], "label": 0},
]
DOCS = [{"text": "for i in range(3):\n    print(i)\n" * 3}, {"text": "class A:\n    pass\n"}]
GEN = [{"context": "abc", "target": "d"}, {"context": "xyz", "target": ""}]

TASKS = {
    "dj_mc": """task: dj_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    "dj_ppl": """task: dj_ppl
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/docs.jsonl}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: bits_per_byte}}]
""",
    "dj_gen": """task: dj_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["q"], max_gen_toks: 4, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""",
}


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lm_eval(model_args: str, tasks_dir: Path, out: Path):
    exe = Path(sys.executable).parent / "lm_eval"
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(out / "hf"),
        DEPTHJAX_QUIET="1",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [
            str(exe),
            "--model",
            "depthjax",
            "--model_args",
            model_args,
            "--tasks",
            "dj_mc,dj_ppl,dj_gen",
            "--include_path",
            str(tasks_dir),
            "--output_path",
            str(out / "results"),
            "--log_samples",
            "--batch_size",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(next((out / "results").rglob("results_*.json")).read_text())
    samples = {
        t: [
            json.loads(line)
            for line in next((out / "results").rglob(f"samples_{t}_*.jsonl"))
            .read_text()
            .splitlines()
        ]
        for t in TASKS
    }
    return results["results"], samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    tasks = tmp / "tasks"
    tasks.mkdir()
    _write(tmp / "mc.jsonl", MC)
    _write(tmp / "docs.jsonl", DOCS)
    _write(tmp / "gen.jsonl", GEN)
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(dir=tmp))
    model = dj.init(dj.configs.get("llama-tiny", max_seq_len=32), jax.random.key(7))
    dj.save(model, tmp / "native")
    (tmp / "spec.yaml").write_text(
        "slices:\n  - layer_range: [0, 2]\n  - layers: [3]\n    mlp: 0\n"
    )
    return tmp, model


def _check_against_dj_eval(model, results, samples):
    mc = dj.eval.multiple_choice(model, MC)
    got = [
        [float(r[0][0]) for r in s["resps"]]
        for s in sorted(samples["dj_mc"], key=lambda s: s["doc_id"])
    ]
    for lls, want in zip(got, mc["loglikelihoods"]):
        np.testing.assert_allclose(lls, want, rtol=1e-5, atol=1e-4)
    assert results["dj_mc"]["acc,none"] == pytest.approx(mc["acc"])
    assert results["dj_mc"]["acc_norm,none"] == pytest.approx(mc["acc_norm"])
    # rolling: every byte scored, the first from the newline prefix (byte-level default)
    ppl = dj.eval.perplexity(model, [d["text"] for d in DOCS], prefix_token=10, max_len=32)
    assert results["dj_ppl"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)
    gen = dj.eval.exact_match(model, GEN, stop=["q"], max_new_tokens=4, strip=False)
    outs = [s["filtered_resps"][0] for s in sorted(samples["dj_gen"], key=lambda s: s["doc_id"])]
    assert outs == gen["outputs"]
    assert results["dj_gen"]["exact_match,none"] == pytest.approx(gen["exact_match"])


def test_lm_eval_cli_on_native_checkpoint_with_slice_spec(setup):
    tmp, model = setup
    results, samples = _lm_eval(
        f"path={tmp / 'native'},program={tmp / 'spec.yaml'}", tmp / "tasks", tmp / "run_native"
    )
    sliced = D.from_spec(model, D.load_spec(tmp / "spec.yaml"))
    _check_against_dj_eval(sliced, results, samples)
    assert math.isfinite(results["dj_ppl"]["bits_per_byte,none"])


def test_lm_eval_cli_on_hugging_face_directory(setup):
    tmp, model = setup
    dj.hf.save(model, tmp / "hf_model")
    results, samples = _lm_eval(
        f"path={tmp / 'hf_model'},prefix_token=10", tmp / "tasks", tmp / "run_hf"
    )
    _check_against_dj_eval(dj.hf.load(tmp / "hf_model"), results, samples)
