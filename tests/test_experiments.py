"""experiments/: the scripts run end to end with the tiniest flags, and the pieces they
add (loss of a program, the pointer-chasing task, padded chains) match naive references."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import stats

import depthjax as dj

EXP = Path(__file__).resolve().parents[1] / "experiments"
TINY = [
    "--steps",
    "4",
    "--layers",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--eval-batches",
    "1",
    "--score-batches",
    "1",
]


def script(name: str):
    """Import experiments/<name>.py (file names start with a digit) as a module."""
    if str(EXP) not in sys.path:
        sys.path.insert(0, str(EXP))
    spec = importlib.util.spec_from_file_location(f"exp_{name}", EXP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("exp-cache")


def run(name, cache, tmp_path, *extra):
    out = tmp_path / name
    script(name).main(TINY + ["--cache", str(cache), "--out", str(out), *extra])
    md, data = (out / "results.md").read_text(), json.loads((out / "results.json").read_text())
    assert md.startswith("# Experiment") and f"experiments/{name}.py" in data["command"]
    return out, md, data


def naive_loss(model, batches):
    """Mean next-token cross-entropy with a numpy log-softmax."""
    total = count = 0.0
    for tokens in batches:
        logits = np.asarray(dj.apply(model, tokens), np.float64)[:, :-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= np.take_along_axis(logp, tokens[:, 1:, None], -1).sum()
        count += tokens[:, 1:].size
    return total / count


@pytest.mark.slow
def test_parallel_layers_script_and_program_loss(cache, tmp_path):
    """Experiment 5 at the tiniest flags, two seeds: every loss is the naive loss of that
    seed's cached base model, parallelized or cut."""
    out, md, data = run("05_parallel_layers", cache, tmp_path, "--seeds", "2")
    common = script("common")
    args = common.parser("x", "").parse_args(TINY + ["--cache", str(cache), "--seeds", "2"])
    batches = common.eval_batches(args)
    assert data["seeds"] == [0, 1] and data["pairs"]["1"] == [[1, 2]]  # 4 steps: one pair
    for i, model in enumerate(common.base_models(args)):  # the cached models the script used
        assert data["full"][i] == pytest.approx(naive_loss(model, batches), rel=1e-5)
        ends = dj.depth.drop(model, [1, 2])  # "drop both" leaves steps 0 and 3
        assert data["pair_loss"]["drop both"][i][0] == pytest.approx(
            naive_loss(ends, batches), rel=1e-5
        )
        par = dj.depth.parallelize(model, [[1, 2]], combine="mean")
        assert data["pair_loss"]["parallel (mean)"][i][0] == pytest.approx(
            naive_loss(par, batches), rel=1e-5
        )
    assert "(n=2)" in md and "What the intervals support" in md
    assert (out / "pairs.png").stat().st_size > 0 and (out / "spans.png").stat().st_size > 0


@pytest.mark.parametrize("path", sorted(EXP.glob("[0-9][0-9]_*.py")), ids=lambda p: p.stem)
def test_every_script_parses_its_flags(path, capsys):
    """Each script's --help exits 0: its own flags do not clash with common's (argparse
    raises on a second --seeds, which only a run of that script would otherwise show)."""
    with pytest.raises(SystemExit) as exit_info:
        script(path.stem).main(["--help"])
    assert exit_info.value.code == 0 and "--seed" in capsys.readouterr().out


def test_fixed_permutation_task_answers_compose_the_permutation():
    hops = script("04_skip_or_loop")
    rng = np.random.default_rng(0)
    perm = rng.permutation(10)
    for _ in range(50):
        text, queries = hops.make_example(rng, 10, 5, 4, perm)
        assert text.count("|") == 4 and len(text) == 16
        for (x, k, y), q in zip(queries, text.split("|")[1:]):
            assert q == f"{k}{x}{y}"
            assert (
                y
                == "abcdefghij"[
                    np.linalg.matrix_power(np.eye(10, dtype=int)[perm], k)[ord(x) - 97].argmax()
                ]
            )


def test_context_task_answers_follow_the_pairs():
    hops = script("04_skip_or_loop")
    rng = np.random.default_rng(0)
    for _ in range(50):
        text, queries = hops.make_example(rng, 7, 4, 3)
        pairs_text, *qs = text.split("|")
        mapping = dict(pairs_text.split(" "))  # independent parse of the text
        assert sorted(mapping) == sorted(mapping.values()) == list("abcdefg")
        for (x, k, y), q in zip(queries, qs):
            assert q == f"{k}{x}{y}"
            z = x
            for _ in range(k):
                z = mapping[z]
            assert z == y


@pytest.mark.slow
def test_chain_search_scores_match_reordered_models():
    """The per-example search's log-probabilities are those of depth.reorder's model on
    that example alone, and greedy never ends below its start."""
    hops = script("04_skip_or_loop")
    model = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(97, 103, (2, 9)).astype(np.int32)
    targets = rng.integers(97, 103, 2)
    res = hops.search(model, tokens, targets, shorten=False, rounds=2, max_len=6)
    for e, (f, start) in enumerate(zip(res.best, res.start)):
        ref = dj.apply(dj.depth.reorder(model, f.candidate.steps), tokens[e : e + 1])[0, -1]
        np.testing.assert_allclose(f.score, jax.nn.log_softmax(ref)[targets[e]], atol=2e-5)
        assert f.score >= start.score and f.depth <= 6
        assert f.measures["right"] == float(np.argmax(ref) == targets[e])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [
        (
            "01_metric_comparison",
            ["--shapley-permutations", "2", "--random-orders", "2", "--seeds", "2"],
        ),
        ("02_attn_vs_mlp", ["--seeds", "2"]),
        ("03_recursive", ["--uptrain-steps", "2", "--ranks", "2", "--seeds", "2"]),
        ("06_norm_placement", ["--seeds", "2"]),
        ("04_skip_or_loop", ["--train-docs", "200", "--examples", "12", "--rounds", "1"]),
        ("07_early_exit", ["--prompt-len", "8", "--new-tokens", "8", "--repeat", "1"]),
    ],
)
def test_script_runs(cache, tmp_path, name, extra):
    out, md, data = run(name, cache, tmp_path, *extra)
    assert not re.search(r"\bnan\b", md, re.I)
    assert list(out.glob("*.png")) or name in ("03_recursive", "04_skip_or_loop")
    if name == "03_recursive":  # relax at full rank reproduces each seed's base model
        assert len(data["base"]) == 2
        assert data["full_rank_relax"] == pytest.approx(data["base"], abs=1e-4)
    if name in ("03_recursive", "06_norm_placement"):
        assert "(n=2)" in md


@pytest.mark.slow
def test_task_tradeoffs_script_prunes_by_each_task(cache, tmp_path):
    # one seed keeps every source and method under test at the old cost (03 and 06 run two)
    flags = ["--task-examples", "4", "--shapley-permutations", "2", "--seeds", "1"]
    flags += ["--tasks", "next_line,identifier_recall", "--methods", "ablation,shapley"]
    out, md, data = run("08_task_tradeoffs", cache, tmp_path, *flags)
    assert set(data["pruned"]) == {
        f"{u}/{s}/{m}"
        for u in ("block", "attn")
        for s in ("next_line", "identifier_recall", "loss")
        for m in ("ablation", "shapley")
    }
    assert (out / "scores.png").stat().st_size > 1000 and "Pruning 1 of 4 blocks" in md
    full = data["full"]
    assert all(0.0 <= a <= 1.0 for t in ("next_line", "identifier_recall") for a in full[t])
    assert all(len(r["loss"]) == len(r["removed"]) == 1 for r in data["pruned"].values())
    assert "(n=1, no spread)" in md and "not resolved at this scale" in md


@pytest.mark.slow
def test_adaptive_depth_scripts(cache, tmp_path):
    """Experiments 9-11 (Mixture-of-Depths, recurrent depth, FiRST) at the tiniest flags."""
    # The routed cache keeps 2 x capacity of the tokens (headroom): at capacity 0.5 it is as
    # large as the dense one, at 0.25 half of it on the routed steps.
    flags = ["--new-tokens", "3", "--capacities", "0.25", "--seeds", "1"]  # one seed: fast
    _, md, data = run("09_mixture_of_depths", cache, tmp_path, *flags)
    assert data["seeds"] == [0] and len(data["per_seed"]) == 1
    for seed in data["per_seed"]:
        ev = seed["mod c=0.25"]
        assert set(ev["causal"]) == {"loss", "routed_fraction"}
        # top-k routing runs exactly k = 4 of 16 tokens per routed step: majority 0.75
        assert ev["topk"]["routed_fraction"] == pytest.approx(0.25)
        assert ev["topk"]["majority_accuracy"] == pytest.approx(0.75)
        assert 0.0 <= ev["topk"]["predictor_accuracy"] <= 1.0
        assert seed["decode"]["routed_len"] < seed["decode"]["max_len"]
        assert seed["decode"]["cache_bytes"] < seed["decode"]["dense_cache_bytes"]
    assert "majority-class accuracy" in md and "(n=1, no spread)" in md
    _, md, data = run(
        "10_recurrent_depth",
        cache,
        tmp_path,
        "--test-loops",
        "1,3",
        "--tols",
        "0.3",
        "--adaptive-max",
        "3",
        "--prompts",
        "2",
        "--new-tokens",
        "3",
        "--max-loops",
        "3",
    )
    assert data["same_tokens"] and len(data["curve"]["recurrent"]) == 2
    g = data["generation"]
    assert g["depthwise"]["ticks"] <= g["lockstep"]["ticks"]
    _, md, data = run("11_first_router", cache, tmp_path, "--costs", "0.1", "--router-steps", "2")
    assert data["decode"]["same_as_static_programs"]
    assert [n for n, _, _ in data["static"]] == [4, 3]


@pytest.mark.slow
def test_search_and_attribution_script(cache, tmp_path):
    """Experiment 12 at the tiniest flags: its ablation column is the naive loss rise of
    each dropped block, and the beam (which scores every 2-of-4 subset) ranks first."""
    flags = ["--budgets", "2", "--router-k", "1", "--router-classes", "2"]
    flags += ["--shapley-keys", "1", "--shapley-permutations", "2"]
    out, md, data = run("12_search_and_attribution", cache, tmp_path, *flags)
    assert md.startswith("# Experiment 12") and (out / "pareto.png").stat().st_size > 1000
    common = script("common")
    args = common.parser("x", "").parse_args(TINY + ["--cache", str(cache)])
    model, batches = common.base_model(args), common.score_batches(args)
    full = naive_loss(model, batches)
    rise = [naive_loss(dj.depth.drop(model, [i]), batches) - full for i in range(4)]
    np.testing.assert_allclose(data["block_scores"]["ablation"], rise, atol=2e-5)
    # Efficiency: exact Shapley values sum to v(all) - v(none) = L(every block off) - L.
    empty = dj.depth.drop_sublayers(model, attn=range(4), mlp=range(4))
    total = naive_loss(empty, batches) - full
    assert sum(data["block_scores"]["exact Shapley"]) == pytest.approx(total, abs=1e-4)
    ranks = {name: rank for _, name, _, rank, *_ in data["search_rows"]}
    assert ranks["enumeration (all subsets)"] == 1 and ranks["beam (width 4)"] == 1
    assert all(r == "-" or r >= 1 for r in ranks.values())


@pytest.mark.slow
def test_layerwise_quantization_script(cache, tmp_path):
    """Experiment 13 at the tiniest flags, two seeds: per seed, every curve starts at the
    all-8-bit loss and ends at the all-4-bit loss (whatever the ordering), and a point is
    the naive loss of that seed's model quantized as its ordering says."""
    flags = ["--shapley-permutations", "2", "--random-orders", "2", "--seeds", "2"]
    out, md, data = run(
        "13_layerwise_quantization", cache, tmp_path, *flags, "--task-examples", "4"
    )
    assert (out / "loss_vs_fraction.png").stat().st_size > 1000
    curves = {k: np.asarray(v) for k, v in data["curves"].items()}
    assert all(c.shape == (2, 5) for c in curves.values())
    for i in range(2):
        assert len({round(c[i, 0], 6) for c in curves.values()}) == 1
        assert len({round(c[i, -1], 6) for c in curves.values()}) == 1
    assert "(n=2)" in md and all(len(a) == 2 for a in data["acc"].values())
    exp, common = script("13_layerwise_quantization"), script("common")
    args = common.parser("x", "").parse_args(TINY + ["--cache", str(cache), "--seed", "1"])
    model, batches = common.base_model(args), common.eval_batches(args)
    order = data["orders"][1]["ablation"]
    q = dj.depth.quantize(model, exp.bits_for(order, 2, 4, 4, 8), group_size=32)
    assert naive_loss(q, batches) == pytest.approx(curves["ablation"][1, 2], abs=2e-5)


@pytest.mark.slow
def test_tleg_script(cache, tmp_path):
    """Experiment 14 at the tiniest flags: two seeds, two depths, a loss per seed each."""
    flags = ["--depths", "2,3", "--seeds", "2", "--aux-depth", "3", "--tune-steps", "2"]
    out, md, data = run("14_tleg", cache, tmp_path, *flags)
    assert (out / "tleg_vs_scratch.png").stat().st_size > 1000
    assert all(len(v) == 2 and np.isfinite(v).all() for v in data["losses"].values())
    for d in (2, 3):  # every figure with its interval, and TLEG - scratch paired by seed
        tleg, scratch = data["losses"][f"tleg depth {d}"], data["losses"][f"scratch depth {d}"]
        lo, hi = stats.t.interval(0.95, 1, loc=np.mean(tleg), scale=stats.sem(tleg))
        assert f"{np.mean(tleg):.4f} ± {np.std(tleg, ddof=1):.4f} [{lo:.4f}, {hi:.4f}]" in md
        diff = np.subtract(tleg, scratch)
        assert f"- depth {d}: {np.mean(diff):.4f} ± {np.std(diff, ddof=1):.4f}" in md


@pytest.mark.slow
def test_stitching_script(cache, tmp_path):
    """Experiment 15 at tiny flags: every stitching point both ways, a loss per calibration
    seed, FLOPs between the anchors', and the first point's loss equal to a naive loss of
    the stitched model rebuilt from the same calibration set."""
    flags = ["--layers", "2", "--widths", "16,32", "--calib-seeds", "2"]
    flags += ["--calib-batches", "1", "--tune-steps", "0"]
    out, md, data = run("15_stitching", cache, tmp_path, *flags)
    assert (out / "pareto.png").stat().st_size > 1000 and "+-" in md
    flops = sorted(a["flops"] for a in data["anchors"].values())
    for rows in data["stitched"].values():
        assert [r["at"] for r in rows] == [1] and len(rows[0]["fitted_runs"]) == 2
        assert flops[0] < rows[0]["flops"] < flops[1]
    exp, common = script("15_stitching"), script("common")
    args = common.parser("x", "").parse_args(TINY + ["--cache", str(cache), "--layers", "2"])
    small, large = (
        common.trained(
            args,
            f"stitch-{name}",
            common.train_config(args, model_overrides=common.model_overrides(args, d_model=w)),
        )
        for name, w in (("small", 16), ("large", 32))
    )
    calib = exp.calibration(args.batch_size, args.seq_len, seed=0, batches=1)
    s = dj.depth.stitch(small, large, at=1, calibration=calib)
    got = data["stitched"]["small -> large"][0]["fitted_runs"][0]
    assert naive_loss(s, common.eval_batches(args)) == pytest.approx(got, abs=2e-5)


@pytest.mark.slow
def test_recovery_methods_script(cache, tmp_path):
    """Experiment 16 at the tiniest flags: two seeds, every method per seed; the full
    model's losses are the naive loss of each seed's base model, and the intervals are
    mean +- t(0.975, n-1) * std / sqrt(n) (two seeds: t with 1 degree of freedom is the
    Cauchy distribution, whose 0.975 quantile is tan(0.475 pi) = 12.706)."""
    flags = ["--seeds", "2", "--recover-steps", "2", "--task-examples", "4"]
    out, md, data = run("16_recovery_methods", cache, tmp_path, *flags, "--calib-batches", "1")
    assert (out / "recovery_methods.png").stat().st_size > 1000
    common = script("common")
    for i, seed in enumerate(data["seeds"]):
        args = common.parser("x", "").parse_args(
            TINY + ["--cache", str(cache), "--seed", str(seed)]
        )
        want = naive_loss(common.base_model(args), common.eval_batches(args))
        assert data["full"]["loss"][i] == pytest.approx(want, abs=2e-5)
    for unit in ("block", "attn"):
        for method, raw in data["raw"][unit].items():
            xs = np.asarray(raw["loss"])
            s = data["summary"][unit][method]["loss"]
            half = np.tan(0.475 * np.pi) * xs.std(ddof=1) / np.sqrt(2)
            assert s["ci95"] == pytest.approx([xs.mean() - half, xs.mean() + half], abs=1e-6)
    assert "not resolved at this scale" in md or "has the lower loss" in md
