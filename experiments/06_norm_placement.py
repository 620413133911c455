"""Experiment 6: norm placement (pre, peri, post) and how depth is used.

Three models that differ only in where the norms sit are trained with the same budget:
pre-norm (norm on each sublayer's input), peri-norm (input and output, as in Peri-LN,
Kim et al. 2025, and Gemma 2/3) and post-norm (norm after each residual add, the original
Transformer and BERT). For each: validation loss, the residual-stream norm across depth,
the block-influence profile (ShortGPT) and leave-one-out ablation. Pre-norm residual
streams grow with depth, so later blocks change the stream's direction less; this is
the mechanism "The Curse of Depth in Large Language Models" (Sun et al. 2025) and the
Peri-LN paper point to for deep pre-norm layers contributing little.
"""

from __future__ import annotations

import numpy as np

import common
from depthjax import metrics as M
from depthjax.pruning.report import pyplot

PLACEMENTS = ("pre", "peri", "post")


def main(argv=None):
    args = common.parse(common.parser("06_norm_placement", __doc__), argv, __file__)
    out = common.out_dir(args)
    score_data, data = common.score_batches(args), common.eval_batches(args)
    res = {}
    for placement in PLACEMENTS:
        # "pre" is the llama default, so the pre-norm run is the shared base model.
        extra = {} if placement == "pre" else {"norm_placement": placement}
        tc = common.train_config(args, model_overrides=common.model_overrides(args, **extra))
        model = common.trained(args, "base" if placement == "pre" else f"norm-{placement}", tc)
        stats = M.trace_metrics(model, score_data)
        res[placement] = {
            "loss": common.loss(model, data),
            "residual_norm": np.asarray(stats["block_influence"].extra["residual_norm"]),
            "block_influence": stats["block_influence"].values,
            "relative_contribution": stats["relative_contribution_block"].values,
            "ablation": M.ablation(model, score_data, unit="block").values,
        }
        common.log(f"{placement}: loss {res[placement]['loss']:.4f}")

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
            ax.plot(
                np.arange(len(ys)),
                ys,
                "o-",
                ms=3,
                label=f"{placement} (loss {res[placement]['loss']:.3f})",
            )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        if key == "residual_norm":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "profiles.png", dpi=110)
    plt.close(fig)

    S = len(res["pre"]["block_influence"])
    half = S // 2
    summary = [
        [
            p,
            res[p]["loss"],
            float(res[p]["residual_norm"][-1] / res[p]["residual_norm"][1]),
            float(res[p]["block_influence"][half:].sum() / res[p]["block_influence"].sum()),
            float(res[p]["ablation"][half:].sum() / res[p]["ablation"].sum()),
        ]
        for p in PLACEMENTS
    ]
    per_step = [
        [i]
        + [
            float(res[p][k][i])
            for k in ("residual_norm", "block_influence", "ablation")
            for p in PLACEMENTS
        ]
        for i in range(S)
    ]
    sections = [
        f"{S}-step models, {args.steps} training steps each, same data and seed.",
        "## Summary\n\n"
        + common.md_table(
            [
                "placement",
                "validation loss",
                "|residual| growth (out of last / in of step 1)",
                "share of block influence in the deeper half",
                "share of ablation loss in the deeper half",
            ],
            summary,
        ),
        "## Per step\n\n"
        + common.md_table(
            ["step"] + [f"{k} {p}" for k in ("norm", "BI", "ablation") for p in PLACEMENTS],
            per_step,
            floatfmt=".3f",
        ),
    ]
    common.write_results(args, out, "Experiment 6: norm placement", sections, res)


if __name__ == "__main__":
    main()
