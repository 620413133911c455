"""Experiment 1: which block-importance metric finds the blocks that are safe to drop?

Scores every step of the base model with block influence (ShortGPT, Men et al. 2024),
angular distance (Gromov et al. 2024), the Csordás et al. relative contribution,
leave-one-out ablation and Monte-Carlo Shapley values, all on the same scoring batches,
then draws each metric's removal curve (validation loss after dropping the k
lowest-scored steps) on separate validation batches. Two reference curves: Gromov et
al.'s span rule (drop the contiguous span of k steps whose input and output are closest
in angle) and the mean of random drop orders.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import common
from depthjax import metrics as M
from depthjax.pruning import report


def span_curve(model, data, score_data) -> np.ndarray:
    """Gromov et al.: for each k, drop the k-step span with the smallest angular distance
    between its input and output (last token)."""
    S = model.depth
    keep = np.ones((S, S), np.int8)
    for k in range(1, S):
        start = M.angular_distance(model, score_data, span=k).extra["best_start"]
        keep[k, start : start + k] = 0
    return common.losses(model, data, keep)


def main(argv=None):
    p = common.parser("01_metric_comparison", __doc__)
    common.ordering_flags(p)
    args = common.parse(p, argv, __file__)
    out, model, score_data, data = common.scored_base(args)
    S = model.depth

    scores, seconds = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        scores[name] = fn()
        seconds[name] = time.perf_counter() - t0
        common.log(f"scored {name:<24} {seconds[name]:6.1f}s")

    t0 = time.perf_counter()
    trace = M.trace_metrics(model, score_data)  # the three trace metrics share one pass
    for name in ("block_influence", "angular_distance", "relative_contribution_block"):
        scores[name], seconds[name] = trace[name], time.perf_counter() - t0
    common.log(f"scored trace metrics (one pass)  {seconds['block_influence']:6.1f}s")
    timed("ablation", lambda: M.ablation(model, score_data, unit="block"))
    timed(
        "shapley",
        lambda: M.shapley(
            model,
            score_data,
            unit="block",
            num_permutations=args.shapley_permutations,
            key=jax.random.key(args.seed),
        ),
    )

    common.log("removal curves")
    curves = {name: M.removal_curve(model, data, s, unit="block") for name, s in scores.items()}
    curves["angular span (Gromov)"] = span_curve(model, data, score_data)
    curves[f"random (mean of {args.random_orders})"] = M.random_removal_curves(
        model, data, num_orders=args.random_orders, max_units=S - 1, seed=args.seed
    ).mean(0)
    full = float(curves["ablation"][0])

    report.plot_curves(
        curves,
        out / "removal_curves.png",
        xlabel="steps dropped",
        ylabel="validation loss (nats/byte)",
        baseline=full,
        title=f"removal curves, {S}-step model",
    )
    report.plot_profiles(scores, out / "profiles.png", title="block importance by metric")

    half = S // 2
    names = list(curves)
    curve_rows = [[k] + [float(curves[n][k]) for n in names] for k in range(S)]
    summary = [
        [
            n,
            " ".join(map(str, np.argsort(scores[n].values, kind="stable"))) if n in scores else "-",
            float(np.mean(curves[n][1 : half + 1])),
            f"{seconds[n]:.2f}" if n in seconds else "-",
        ]
        for n in names
    ]
    sections = [
        f"Base model: {model.config.family}, d_model={model.config.d_model}, {S} steps, "
        f"full-model validation loss {full:.4f} nats/byte.",
        "## Validation loss after dropping k steps\n\n"
        + common.md_table(["k"] + names, curve_rows),
        f"## Drop order (least important first) and mean loss over k=1..{half}\n\n"
        + common.md_table(
            ["metric", "drop order", f"mean loss k=1..{half}", "score time (s)"], summary
        ),
        "## Scores per step (higher = more important)\n\n```\n" + report.table(scores) + "\n```",
    ]
    common.write_results(
        args,
        out,
        "Experiment 1: metric comparison",
        sections,
        {"scores": scores, "curves": curves, "seconds": seconds, "full": full},
    )


if __name__ == "__main__":
    main()
