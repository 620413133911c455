"""Experiment 6: norm placement (pre, peri, post) and how depth is used.

Three models that differ only in where the norms sit are trained with the same budget:
pre-norm (norm on each sublayer's input), peri-norm (input and output, as in Peri-LN,
Kim et al. 2025, and Gemma 2/3) and post-norm (norm after each residual add, the original
Transformer and BERT). For each: validation loss, the residual-stream norm across depth,
the block-influence profile (ShortGPT) and leave-one-out ablation. Pre-norm residual
streams grow with depth, so later blocks change the stream's direction less; this is
the mechanism "The Curse of Depth in Large Language Models" (Sun et al. 2025) and the
Peri-LN paper point to for deep pre-norm layers contributing little.

Every placement is trained for --seeds seeds (the pre-norm ones are the shared base
models); figures are mean ± std [95% interval] over seeds, and placements are compared
paired by seed (the same seed gives the same initial draw and data order).
"""

from __future__ import annotations

import numpy as np

import common
from depthjax import metrics as M
from depthjax.pruning.report import pyplot

PLACEMENTS = ("pre", "peri", "post")
PROFILES = ("residual_norm", "block_influence", "relative_contribution", "ablation")
SUMMARY = {
    "loss": "validation loss",
    "growth": "|residual| growth (out of last / in of step 1)",
    "bi_deep": "share of block influence in the deeper half",
    "ablation_deep": "share of ablation loss in the deeper half",
}


def profile(model, score_data, data) -> dict:
    """The loss and the per-step profiles of one model."""
    stats = M.trace_metrics(model, score_data)
    return {
        "loss": common.loss(model, data),
        "residual_norm": np.asarray(stats["block_influence"].extra["residual_norm"]),
        "block_influence": np.asarray(stats["block_influence"].values),
        "relative_contribution": np.asarray(stats["relative_contribution_block"].values),
        "ablation": np.asarray(M.ablation(model, score_data, unit="block").values),
    }


def summarize(r: dict) -> dict:
    """The summary figures of one model's profile."""
    half = len(r["block_influence"]) // 2
    return {
        "loss": r["loss"],
        "growth": float(r["residual_norm"][-1] / r["residual_norm"][1]),
        "bi_deep": float(r["block_influence"][half:].sum() / r["block_influence"].sum()),
        "ablation_deep": float(r["ablation"][half:].sum() / r["ablation"].sum()),
    }


def main(argv=None):
    args = common.parse(common.parser("06_norm_placement", __doc__), argv, __file__)
    out = common.out_dir(args)
    score_data, data = common.score_batches(args), common.eval_batches(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    res = {}  # placement -> key -> [seeds] or [seeds, S]
    for placement in PLACEMENTS:
        if placement == "pre":  # the llama default: the shared base models
            models = common.base_models(args)
        else:
            over = common.model_overrides(args, norm_placement=placement)
            tc = common.train_config(args, model_overrides=over)
            models = common.trained_seeds(args, f"norm-{placement}", tc, seeds)
        runs = [profile(m, score_data, data) for m in models]
        sums = [summarize(r) for r in runs]
        res[placement] = {
            **{k: np.stack([r[k] for r in runs]) for k in PROFILES},
            **{k: np.array([s[k] for s in sums]) for k in SUMMARY},
        }
        common.log(f"{placement}: loss {common.fmt(res[placement]['loss'])}")

    plot(res, out / "profiles.png", len(seeds))
    S = res["pre"]["block_influence"].shape[1]
    summary = [[p] + [common.fmt(res[p][k], 3) for k in SUMMARY] for p in PLACEMENTS]
    per_step = [
        [i]
        + [
            float(res[p][k][:, i].mean())
            for k in ("residual_norm", "block_influence", "ablation")
            for p in PLACEMENTS
        ]
        for i in range(S)
    ]
    verdicts = [
        common.compared(f"{label}, {a} - {b}", res[a][k], res[b][k], 3)
        for k, label in SUMMARY.items()
        for a, b in (("pre", "peri"), ("pre", "post"), ("peri", "post"))
    ]
    sections = [
        f"{S}-step models, {args.steps} training steps each, the same data order per seed; "
        f"{len(seeds)} seeds ({seeds}); figures are mean ± std [95% t-interval] over seeds.",
        "## Summary\n\n" + common.md_table(["placement", *SUMMARY.values()], summary),
        "## Placements compared (paired by seed, 95%)\n\n" + "\n".join(verdicts),
        "## Per step (means over seeds)\n\n"
        + common.md_table(
            ["step"] + [f"{k} {p}" for k in ("norm", "BI", "ablation") for p in PLACEMENTS],
            per_step,
            floatfmt=".3f",
        ),
    ]
    common.write_results(
        args, out, "Experiment 6: norm placement", sections, {"seeds": seeds, **res}
    )


def plot(res: dict, path, n_seeds: int) -> None:
    """Per-step profiles: the mean over seeds, shaded ± one std."""
    plt = pyplot()
    panels = [
        ("residual_norm", "|residual| (input of step i; last = output)"),
        ("block_influence", "block influence 1 - cos(in, out)"),
        ("relative_contribution", "|block update| / |residual in|"),
        ("ablation", "leave-one-out loss rise"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        for placement in PLACEMENTS:
            ys = res[placement][key]
            mean, x = ys.mean(0), np.arange(ys.shape[1])
            loss = res[placement]["loss"].mean()
            (line,) = ax.plot(x, mean, "o-", ms=3, label=f"{placement} (loss {loss:.3f})")
            if n_seeds > 1:
                std = ys.std(0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        if key == "residual_norm":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean ± std over {n_seeds} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
