"""`depthjax demo`: the main job, end to end on the embedded corpus (no downloads).

1. train a small llama-style byte-level model on Python standard library sources, for
   3 seeds in one compiled program (`--seeds`);
2. for each seed's model, score every step with every metric on calibration text;
3. prune 25% of the blocks by each block metric (and 25% of the attention sublayers by
   each attention metric), against random pruning as the control: the loss's mean and
   spread over 16 random subsets of the same size (all of them when there are fewer);
4. recover each pruned model with bias and linear emulation;
5. report every figure as mean ± std [95% interval] over the seeds, say which metrics
   beat the random control (paired by seed), and write a report folder: report.json,
   report.md, profiles.png, removal_curves.png, recovery.png.

The default run takes at most 15 minutes on an idle 2-core CPU; --quick (2 seeds of a
smaller model) about two. A GPU or TPU is used automatically when JAX sees one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import add_quiet_arg, count

SETTINGS = {  # quick: CI and tests; full: the README's main command (<= 15 min, 2-core CPU)
    "quick": dict(
        model="llama-tiny",
        steps=60,
        batch_size=8,
        seq_len=128,
        seeds=2,
        calib=2,
        evals=2,
        eval_batch=8,
        permutations=None,
        rank=8,
        random_subsets=16,
    ),
    "full": dict(
        model="llama-small",
        steps=300,
        batch_size=8,
        seq_len=128,
        seeds=3,
        calib=4,
        evals=8,
        eval_batch=8,
        permutations=None,
        rank=16,
        random_subsets=16,
    ),
}


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_models(out: Path, s: dict, seed: int, seeds: int) -> list:
    """Train (or resume) seeds seed..seed+seeds-1 in one program into out/train; return
    the final models, one per seed."""
    import depthjax as dj
    from ..train import TrainConfig, model_paths, run

    tc = TrainConfig(
        model=s["model"],
        steps=s["steps"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        seed=seed,
        seeds=seeds,
        lr=3e-3,
        warmup_steps=max(5, s["steps"] // 10),
        log_every=max(1, s["steps"] // 10),
        checkpoint_every=max(10, s["steps"] // 2),
        tensorboard=False,
    )
    from ..train.run_dir import DifferentRun

    try:
        run(out / "train", tc)
    except DifferentRun as e:  # a demo of other settings (or an older depthjax) trained there
        _log(f"{out / 'train'} holds another run; starting over (the old one is moved aside): {e}")
        run(out / "train", tc, fresh=True)
    return [dj.load(path) for path in model_paths(out / "train", tc)]


def prune_and_recover(
    model, scores: dict, calib, evals, unit: str, n: int, rank: int, loss
) -> dict[str, dict]:
    """Validation loss of the pruned and recovered model for each metric's ranking."""
    import depthjax as dj
    from .. import progress
    from ..pruning.choose import choose

    rows = {}
    for name, s in progress.track(scores.items(), f"prune + recover ({unit})", len(scores)):
        pruned = dj.prune(model, s, n, unit=unit)
        row = {"removed": choose(model, s, n, unit).tolist(), "pruned": loss(pruned)}
        for method in ("bias", "linear"):
            rec = dj.recover(
                pruned, model, calib, method=method, rank=rank if method == "linear" else None
            )
            row[method] = loss(rec)
        rows[name] = row
        _log(
            f"{unit:>5} by {name:<28} removed {row['removed']}: loss {row['pruned']:.4f} -> "
            f"bias {row['bias']:.4f}, linear {row['linear']:.4f}"
        )
    return rows


def _subsets(control: dict) -> str:
    """'all 4' or '16 random': how many subsets a random control (to_dict) measured."""
    k = len(control["values"])
    return f"all {k}" if control["exhaustive"] else f"{k} random"


def _over_seeds(runs: list[dict]) -> dict:
    """The per-seed figures side by side: full_loss [seeds]; per unit, per metric the
    pruned / bias / linear losses [seeds] and the blocks removed; and the random control's
    mean loss [seeds]."""
    out = {"full_loss": [r["full_loss"] for r in runs]}
    for unit in runs[0]["pruning"]:
        rows = {
            name: {
                key: [r["pruning"][unit][name][key] for r in runs]
                for key in ("removed", "pruned", "bias", "linear")
            }
            for name in runs[0]["pruning"][unit]
        }
        out[unit] = {"metrics": rows, "random": [r["random"][unit]["mean"] for r in runs]}
    return out


def _ms(values) -> str:
    """'mean ± std' over seeds (3 decimals); one value alone as itself."""
    x = np.asarray(values, np.float64)
    return f"{x[0]:.3f}" if x.size == 1 else f"{x.mean():.3f} ± {x.std(ddof=1):.3f}"


def _paired(a, b, below: str = "below", above: str = "above") -> str:
    """The mean of a - b over seeds with its 95% t-interval and what it supports: `below`
    or `above` where the interval excludes 0, else "not resolved"."""
    from ..metrics import separated, spread

    if len(a) < 2:
        return "one run: no interval"
    mean, _, (lo, hi) = spread(np.subtract(a, b))
    verdict = (below if mean < 0 else above) if separated(a, b) else "not resolved"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}"


def _removed_counts(removed: list[list[int]]) -> str:
    """'[2, 6] x2, [2, 5] x1': the sets removed over seeds, most frequent first."""
    keys = [str(sorted(r)) for r in removed]  # ties keep the order of the seeds
    ranked = sorted(dict.fromkeys(keys), key=lambda k: -keys.count(k))
    return ", ".join(f"{k} x{keys.count(k)}" for k in ranked)


def _markdown(report: dict) -> str:
    from ..metrics import fmt

    r, by = report, report["over_seeds"]
    seeds = r["train"]["seeds"]
    lines = [
        "# depthjax demo report",
        "",
        f"Model: `{r['model']['preset']}` ({r['model']['params']:,} parameters, "
        f"{r['model']['depth']} steps), trained {r['train']['steps']} steps on the "
        f"{r['corpus']['name']} (byte-level; {r['corpus']['files']['train']} train and "
        f"{r['corpus']['files']['valid']} validation files, corpus SHA-256 "
        f"`{r['corpus']['sha256'][:16]}`), once per seed: seeds {seeds}. Every figure is "
        "over the seeds; a comparison is stated only where the 95% t-interval of its per-seed "
        'differences excludes 0, else it reads "not resolved".',
        "",
        f"Full-model validation loss: **{fmt(by['full_loss'])}** nats/byte.",
        "",
        f"## Step scores (seed {seeds[0]}; higher = more important)",
        "",
        "```",
        r["runs"][0]["table"],
        "```",
        "",
        "![profiles](profiles.png)",
        "",
    ]
    depth = r["model"]["depth"]
    for unit, title in (
        ("block", f"Pruning {r['n_blocks']} of {depth} blocks"),
        ("attn", f"Pruning {r['n_attn']} of {depth} attention sublayers"),
    ):
        random = by[unit]["random"]
        lines += [
            f"## {title}",
            "",
            "| metric | removed (per seed) | pruned | + bias | + linear | pruned - random |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in by[unit]["metrics"].items():
            lines.append(
                f"| {name} | {_removed_counts(row['removed'])} | {_ms(row['pruned'])} | "
                f"{_ms(row['bias'])} | {_ms(row['linear'])} | "
                f"{_paired(row['pruned'], random)} |"
            )
        control = r["runs"][0]["random"][unit]
        over = _subsets(control)
        lines += [
            f"| random (control) | {over} subsets per seed | {_ms(random)} | - | - | |",
            "",
            f"random (control): per seed, the mean loss after removing {control['n']} "
            f"{'blocks' if unit == 'block' else 'attention sublayers'} chosen at random over "
            f"{over} subsets of that size (not recovered); the row is its spread over seeds. "
            "Losses are mean ± std over seeds; pruned - random is the mean per-seed difference "
            "from the control with its 95% t-interval.",
            "",
        ]
    lines += [
        "## Removal curves (mean ± std over seeds)",
        "",
        "![removal curves](removal_curves.png)",
        "",
        "## Recovery (mean ± std over seeds)",
        "",
        "![recovery](recovery.png)",
        "",
        f"Total time {r['seconds']:.0f}s on {r['device']}.",
    ]
    return "\n".join(lines) + "\n"


def _plot_recovery(over_seeds: dict, path) -> None:
    from ..pruning.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    full = np.mean(over_seeds["full_loss"])
    for ax, unit in zip(axes[0], ("block", "attn")):
        rows = over_seeds[unit]["metrics"]
        names = list(rows)
        x = np.arange(len(names))
        for j, key in enumerate(("pruned", "bias", "linear")):
            values = np.array([rows[n][key] for n in names])  # [metrics, seeds]
            err = values.std(1, ddof=1) if values.shape[1] > 1 else None
            ax.bar(x + (j - 1) * 0.27, values.mean(1), 0.27, yerr=err, capsize=2, label=key)
        ax.axhline(full, color="gray", ls=":", label="full model")
        random = np.array(over_seeds[unit]["random"])
        if random.size > 1:
            lo, hi = random.mean() - random.std(ddof=1), random.mean() + random.std(ddof=1)
            ax.axhspan(lo, hi, color="tab:red", alpha=0.15)
        ax.axhline(random.mean(), color="tab:red", ls="--", lw=1, label="random (mean ± std)")
        ax.set_xticks(
            x,
            [n.replace("relative_contribution", "rel_contrib") for n in names],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylabel("validation loss")
        ax.set_title(f"{unit} pruning and recovery", fontsize=10)
        lo = min(min(np.mean(r[k]) for k in ("pruned", "bias", "linear")) for r in rows.values())
        ax.set_ylim(min(full, lo) * 0.98, None)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_removal_curves(runs: list[dict], path) -> None:
    """Each metric's removal curve, mean ± std over seeds; random orders pooled over seeds."""
    from ..pruning import report

    names = list(runs[0]["removal_curves"])
    curves, bands = {}, {}
    for name in names:
        ys = np.array([r["removal_curves"][name] for r in runs])  # [seeds, depth]
        curves[name] = ys.mean(0)
        if len(runs) > 1:
            std = ys.std(0, ddof=1)
            bands[name] = (curves[name] - std, curves[name] + std)
    orders = np.concatenate([r["random_orders"] for r in runs])  # [seeds * orders, depth]
    random = f"random ({len(orders)} orders over {len(runs)} seeds)"
    curves[random], std = orders.mean(0), orders.std(0, ddof=1)
    bands[random] = (curves[random] - std, curves[random] + std)
    report.plot_curves(
        curves,
        path,
        xlabel="blocks removed",
        ylabel="validation loss",
        baseline=float(np.mean([r["full_loss"] for r in runs])),
        title="removing blocks in each metric's order",
        bands=bands,
    )


def run_demo(out, quick: bool = False, seed: int = 0, seeds: int | None = None) -> dict:
    """The main job: train `seeds` models (default: 3, --quick 2) and analyse each."""
    from .. import progress

    s = dict(SETTINGS["quick" if quick else "full"])
    s["seeds"] = s["seeds"] if seeds is None else seeds
    if s["seeds"] < 1:
        raise ValueError(f"the demo needs at least one seed, got seeds={s['seeds']}")
    with progress.bar("demo", total=2 + s["seeds"]) as stages:
        return _run_demo(Path(out), s, quick, seed, stages)


def _analyze(model, s: dict, calib, evals, seed: int) -> dict:
    """One trained model: every metric, pruning + recovery by each, the random controls,
    removal curves."""
    import jax

    from .. import metrics as M
    from ..pruning import report

    loss = lambda m: M.loss(m, evals)
    full = loss(model)
    _log(f"seed {seed}: validation loss {full:.4f}; scoring every step with every metric")
    scores = report.score_all(
        model,
        calib,
        shapley_permutations=s["permutations"],
        key=jax.random.key(seed),
        log=lambda m: _log("    " + m),
    )
    block_scores = report.importance(scores, "block")
    table = report.table(scores, "block")
    print(table, flush=True)
    n = max(1, model.depth // 4)
    pruning, controls = {}, {}
    for unit in ("block", "attn"):
        pruning[unit] = prune_and_recover(
            model, report.importance(scores, unit), calib, evals, unit, n, s["rank"], loss
        )
        controls[unit] = c = M.random_pruning(
            model, evals, n, unit, num_subsets=s["random_subsets"], seed=seed
        )
        _log(f"{unit:>5} by random (control): loss {c.describe()}")
    return {
        "seed": seed,
        "full_loss": full,
        "scores": scores,
        "table": table,
        "pruning": pruning,
        "random": {unit: c.to_dict() for unit, c in controls.items()},
        "removal_curves": report.removal_curves(model, evals, block_scores, "block"),
        "random_orders": M.random_removal_curves(
            model, evals, "block", num_orders=s["random_subsets"], seed=seed
        ),
    }


def _run_demo(out: Path, s: dict, quick: bool, seed: int, stages) -> dict:
    import jax

    from ..files import corpus
    from ..pruning import report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(seed, seed + s["seeds"]))
    _log(f"{'quick' if quick else 'full'} run into {out}/ on {jax.devices()[0].platform}")
    _log(f"training {s['model']} for {s['steps']} steps, seeds {seeds} in one program")
    models = train_models(out, s, seed, s["seeds"])
    stages.advance()
    # One calibration and one validation set for every seed: the seeds differ only in the
    # trained model, so the comparisons below pair by seed.
    calib = [
        corpus.sample_windows(s["batch_size"], s["seq_len"], seed=seed + i)
        for i in range(s["calib"])
    ]
    evals = [
        corpus.sample_windows(s["eval_batch"], s["seq_len"], seed=seed + 1000 + i, split="valid")
        for i in range(s["evals"])
    ]
    runs = []
    for model_seed, model in zip(seeds, models):
        runs.append(_analyze(model, s, calib, evals, model_seed))
        stages.advance()

    _log("report and plots")
    model = models[0]
    res = {
        "model": {
            "preset": s["model"],
            "depth": model.depth,
            "d_model": model.config.d_model,
            "params": model.n_params,
        },
        "train": {
            "steps": s["steps"],
            "batch_size": s["batch_size"],
            "seq_len": s["seq_len"],
            "seeds": seeds,
        },
        "corpus": corpus.describe(),
        "n_blocks": max(1, model.depth // 4),
        "n_attn": max(1, model.depth // 4),
        "over_seeds": _over_seeds(runs),
        "runs": runs,
        "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
    }
    report.plot_profiles(
        [r["scores"] for r in runs],
        out / "profiles.png",
        title="step scores, one line per seed (dotted: |residual|)",
    )
    _plot_removal_curves(runs, out / "removal_curves.png")
    _plot_recovery(res["over_seeds"], out / "recovery.png")
    res["seconds"] = time.time() - t0
    report.write_json(res, out / "report.json")
    (out / "report.md").write_text(_markdown(res))
    stages.advance()
    _summary(res)
    _log(
        f"done in {res['seconds']:.0f}s: {out}/report.md, report.json, profiles.png, "
        "removal_curves.png, recovery.png"
    )
    return res


def _summary(res: dict) -> None:
    from ..metrics import fmt

    c, by = res["corpus"], res["over_seeds"]
    print(f"\ncorpus: {c['name']}, {c['bytes']:,} bytes, SHA-256 {c['sha256'][:16]}")
    print(f"seeds {res['train']['seeds']}: mean ± std [95% interval] over seeds")
    print(f"validation loss, full model: {fmt(by['full_loss'])}")
    for unit in ("block", "attn"):
        rows, random = by[unit]["metrics"], by[unit]["random"]
        print(f"\n{unit} pruning ({res['n_' + ('blocks' if unit == 'block' else 'attn')]} removed)")
        for name, row in sorted(rows.items(), key=lambda kv: np.mean(kv[1]["pruned"])):
            print(f"  {name:<28} removed {_removed_counts(row['removed'])}")
            for key in ("pruned", "bias", "linear"):
                print(f"      {key:<8} {fmt(row[key])}")
            print(f"      - random {_paired(row['pruned'], random)}")
        over = _subsets(res["runs"][0]["random"][unit])
        print(f"  {'random (control)':<28} {fmt(random)} ({over} subsets per seed; not recovered)")


def add_command(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train, score, prune and recover a small model; write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="about a minute on a CPU (tests, CI)")
    p.add_argument(
        "--out",
        default="demo_report",
        help="report folder (default demo_report/; training resumes from out/train)",
    )
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument(
        "--seeds",
        type=count,
        default=None,
        help="models trained, seed..seed+N-1, in one program (default 3; --quick 2)",
    )
    add_quiet_arg(p)
    p.set_defaults(
        func=lambda a: (run_demo(a.out, quick=a.quick, seed=a.seed, seeds=a.seeds), 0)[1]
    )
