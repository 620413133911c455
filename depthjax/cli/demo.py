"""`depthjax demo`: the main job, end to end on the embedded corpus (no downloads).

1. train a small llama-style byte-level model on Python standard library sources;
2. score every step with every metric on calibration text;
3. prune 25% of the blocks by each block metric (and 25% of the attention sublayers by
   each attention metric), against random pruning as the control: the loss's mean and
   spread over 16 random subsets of the same size (all of them when there are fewer);
4. recover each pruned model with bias and linear emulation;
5. evaluate validation loss for all of these, print tables, and write a report folder:
   report.json, report.md, profiles.png, removal_curves.png, recovery.png.

The default run takes about 10 minutes on a 2-core CPU; --quick about a minute. A GPU or
TPU is used automatically when JAX sees one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import add_quiet_arg

SETTINGS = {  # quick: CI and tests; full: the README's main command
    "quick": dict(
        model="llama-tiny",
        steps=60,
        batch_size=8,
        seq_len=128,
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
        batch_size=16,
        seq_len=256,
        calib=4,
        evals=8,
        eval_batch=16,
        permutations=None,
        rank=16,
        random_subsets=16,
    ),
}


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_model(out: Path, s: dict, seed: int):
    """Train (or resume) into out/train and return the final model."""
    import depthjax as dj
    from ..train import TrainConfig, run

    tc = TrainConfig(
        model=s["model"],
        steps=s["steps"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        seed=seed,
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
    return dj.load(out / "train" / "model")


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


def _markdown(report: dict) -> str:
    r = report
    lines = [
        "# depthjax demo report",
        "",
        f"Model: `{r['model']['preset']}` ({r['model']['params']:,} parameters, "
        f"{r['model']['depth']} steps), trained {r['train']['steps']} steps on the "
        f"{r['corpus']['name']} (byte-level; {r['corpus']['files']['train']} train and "
        f"{r['corpus']['files']['valid']} validation files, corpus SHA-256 "
        f"`{r['corpus']['sha256'][:16]}`). Full-model validation loss: "
        f"**{r['full_loss']:.4f}** nats/byte. The figures are one training run: another "
        "machine (or corpus digest) trains a different model, and the blocks chosen can differ.",
        "",
        "## Step scores (higher = more important)",
        "",
        "```",
        r["table"],
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
        lines += [
            f"## {title}",
            "",
            "| metric | removed | pruned | + bias | + linear |",
            "|---|---|---|---|---|",
        ]
        for name, row in r["pruning"][unit].items():
            lines.append(
                f"| {name} | {row['removed']} | {row['pruned']:.4f} | {row['bias']:.4f} | "
                f"{row['linear']:.4f} |"
            )
        c = r["random"][unit]
        over = _subsets(c)
        lines += [
            f"| random (control) | {over} subsets | {c['mean']:.4f} ± {c['std']:.4f} "
            f"({c['min']:.4f}-{c['max']:.4f}) | - | - |",
            "",
            f"random (control): the loss after removing {c['n']} "
            f"{'blocks' if unit == 'block' else 'attention sublayers'} chosen at random, "
            f"mean ± sample std (min-max) over {over} subsets of that size (not recovered).",
            "",
        ]
    lines += [
        "## Removal curves",
        "",
        "![removal curves](removal_curves.png)",
        "",
        "## Recovery",
        "",
        "![recovery](recovery.png)",
        "",
        f"Total time {r['seconds']:.0f}s on {r['device']}.",
    ]
    return "\n".join(lines) + "\n"


def _plot_recovery(pruning: dict, full: float, controls: dict, path) -> None:
    from ..pruning.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (unit, rows) in zip(axes[0], pruning.items()):
        names = list(rows)
        x = np.arange(len(names))
        for j, key in enumerate(("pruned", "bias", "linear")):
            ax.bar(x + (j - 1) * 0.27, [rows[n][key] for n in names], 0.27, label=key)
        ax.axhline(full, color="gray", ls=":", label="full model")
        c = controls[unit]
        ax.axhspan(c.mean - c.std, c.mean + c.std, color="tab:red", alpha=0.15)
        ax.axhline(c.mean, color="tab:red", ls="--", lw=1, label="random (mean ± std)")
        ax.set_xticks(
            x,
            [n.replace("relative_contribution", "rel_contrib") for n in names],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylabel("validation loss")
        ax.set_title(f"{unit} pruning and recovery", fontsize=10)
        lo = min(min(r["pruned"], r["bias"], r["linear"]) for r in rows.values())
        ax.set_ylim(min(full, lo) * 0.98, None)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out, quick: bool = False, seed: int = 0) -> dict:
    from .. import progress

    with progress.bar("demo", total=5) as stages:
        return _run_demo(out, quick, seed, stages)


def _run_demo(out, quick: bool, seed: int, stages) -> dict:
    import jax

    from .. import metrics as M
    from ..files import corpus
    from ..pruning import report

    t0 = time.time()
    s = SETTINGS["quick" if quick else "full"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _log(f"{'quick' if quick else 'full'} run into {out}/ on {jax.devices()[0].platform}")

    _log(f"1/5 training {s['model']} for {s['steps']} steps")
    model = train_model(out, s, seed)
    stages.advance()
    calib = [
        corpus.sample_windows(s["batch_size"], s["seq_len"], seed=seed + i)
        for i in range(s["calib"])
    ]
    evals = [
        corpus.sample_windows(s["eval_batch"], s["seq_len"], seed=seed + 1000 + i, split="valid")
        for i in range(s["evals"])
    ]
    loss = lambda m: M.loss(m, evals)
    full = loss(model)
    _log(f"trained: {model!r}".splitlines()[0] + f"; validation loss {full:.4f}")

    _log("2/5 scoring every step with every metric")
    scores = report.score_all(
        model,
        calib,
        shapley_permutations=s["permutations"],
        key=jax.random.key(seed),
        log=lambda m: _log("    " + m),
    )
    stages.advance()
    block_scores = report.importance(scores, "block")
    attn_scores = report.importance(scores, "attn")
    table = report.table(scores, "block")
    print(table, flush=True)

    n = max(1, model.depth // 4)
    _log(f"3-4/5 pruning {n} blocks / {n} attention sublayers by each metric, recovering")
    pruning, controls = {}, {}
    for unit, unit_scores in (("block", block_scores), ("attn", attn_scores)):
        pruning[unit] = prune_and_recover(
            model, unit_scores, calib, evals, unit, n, s["rank"], loss
        )
        controls[unit] = c = M.random_pruning(
            model, evals, n, unit, num_subsets=s["random_subsets"], seed=seed
        )
        _log(f"{unit:>5} by random (control): loss {c.describe()}")
        stages.advance()
    stages.advance()

    _log("5/5 removal curves and report")
    curves = report.removal_curves(model, evals, block_scores, "block")
    orders = M.random_removal_curves(
        model, evals, "block", num_orders=s["random_subsets"], seed=seed
    )
    random_curve, spread = f"random (mean of {len(orders)} orders)", orders.std(0, ddof=1)
    curves[random_curve] = orders.mean(0)
    res = {
        "model": {
            "preset": s["model"],
            "depth": model.depth,
            "d_model": model.config.d_model,
            "params": model.n_params,
        },
        "train": {"steps": s["steps"], "batch_size": s["batch_size"], "seq_len": s["seq_len"]},
        "corpus": corpus.describe(),
        "full_loss": full,
        "n_blocks": n,
        "n_attn": n,
        "scores": scores,
        "table": table,
        "pruning": pruning,
        "random": {unit: c.to_dict() for unit, c in controls.items()},
        "removal_curves": curves,
        "random_removal_std": spread,
        "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
    }
    report.plot_profiles(scores, out / "profiles.png", title="step scores (dotted: |residual|)")
    report.plot_curves(
        curves,
        out / "removal_curves.png",
        xlabel="blocks removed",
        ylabel="validation loss",
        baseline=full,
        title="removing blocks in each metric's order",
        bands={random_curve: (curves[random_curve] - spread, curves[random_curve] + spread)},
    )
    _plot_recovery(pruning, full, controls, out / "recovery.png")
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
    c = res["corpus"]
    print(f"\ncorpus: {c['name']}, {c['bytes']:,} bytes, SHA-256 {c['sha256'][:16]}")
    print(f"validation loss, full model: {res['full_loss']:.4f}")
    for unit, rows in res["pruning"].items():
        print(f"\n{unit} pruning ({res['n_' + ('blocks' if unit == 'block' else 'attn')]} removed)")
        print(f"  {'metric':<28} {'removed':<12} {'pruned':>8} {'+bias':>8} {'+linear':>8}")
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["pruned"]):
            print(
                f"  {name:<28} {str(row['removed']):<12} {row['pruned']:>8.4f} "
                f"{row['bias']:>8.4f} {row['linear']:>8.4f}"
            )
        c = res["random"][unit]
        over = _subsets(c)
        print(
            f"  {'random (control)':<28} {over + ' sets':<12} {c['mean']:>8.4f} "
            f"± {c['std']:.4f} (min {c['min']:.4f}, max {c['max']:.4f}; not recovered)"
        )


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
    p.add_argument("--seed", type=int, default=0)
    add_quiet_arg(p)
    p.set_defaults(func=lambda a: (run_demo(a.out, quick=a.quick, seed=a.seed), 0)[1])
