"""Experiment 1: which block-importance metric finds the blocks that are safe to drop?

Scores every step of the base model with block influence (ShortGPT, Men et al. 2024),
angular distance (Gromov et al. 2024), the Csordás et al. relative contribution,
leave-one-out ablation and Monte-Carlo Shapley values, all on the same scoring batches,
then draws each metric's removal curve (validation loss after dropping the k
lowest-scored steps) on separate validation batches. Two reference curves: Gromov et
al.'s span rule (drop the contiguous span of k steps whose input and output are closest
in angle) and the mean of random drop orders.

All of this is repeated on each of the --seeds trained base models; every figure is
reported as mean ± std [95% t-interval] over the seeds, and every comparison (each
metric against random and against ablation) by the interval of its per-seed differences.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import common
from depthjax import metrics as M
from depthjax.pruning import report

TRACE = ("block_influence", "angular_distance", "relative_contribution_block")
SPAN = "angular span (Gromov)"
RANDOM = "random"


def span_curve(model, data, score_data) -> np.ndarray:
    """Gromov et al.: for each k, drop the k-step span with the smallest angular distance
    between its input and output (last token)."""
    S = model.depth
    keep = np.ones((S, S), np.int8)
    for k in range(1, S):
        start = M.angular_distance(model, score_data, span=k).extra["best_start"]
        keep[k, start : start + k] = 0
    return common.losses(model, data, keep)


def score_and_curves(model, args, seed: int, score_data, data):
    """(scores, scoring seconds, removal curves) of one base model."""
    S = model.depth
    scores, seconds = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        scores[name] = fn()
        seconds[name] = time.perf_counter() - t0
        common.log(f"seed {seed}: scored {name:<24} {seconds[name]:6.1f}s")

    t0 = time.perf_counter()
    trace = M.trace_metrics(model, score_data)  # the three trace metrics share one pass
    for name in TRACE:
        scores[name], seconds[name] = trace[name], time.perf_counter() - t0
    common.log(f"seed {seed}: scored trace metrics (one pass)  {seconds[TRACE[0]]:6.1f}s")
    timed("ablation", lambda: M.ablation(model, score_data, unit="block"))
    timed(
        "shapley",
        lambda: M.shapley(
            model,
            score_data,
            unit="block",
            num_permutations=args.shapley_permutations,
            key=jax.random.key(seed),
        ),
    )
    curves = {name: M.removal_curve(model, data, s, unit="block") for name, s in scores.items()}
    curves[SPAN] = span_curve(model, data, score_data)
    curves[RANDOM] = M.random_removal_curves(
        model, data, num_orders=args.random_orders, max_units=S - 1, seed=seed
    ).mean(0)
    return scores, seconds, curves


def main(argv=None):
    p = common.parser("01_metric_comparison", __doc__)
    common.ordering_flags(p)
    args = common.parse(p, argv, __file__)
    out, score_data, data = (
        common.out_dir(args),
        common.score_batches(args),
        common.eval_batches(args),
    )
    models, seeds = common.base_models(args), common.seed_list(args)
    S, half = models[0].depth, models[0].depth // 2

    curves, seconds, orders, per_seed_scores = {}, {}, {}, []  # curves: name -> [seed, k]
    for seed, model in zip(seeds, models):
        scores, secs, cs = score_and_curves(model, args, seed, score_data, data)
        for name, c in cs.items():
            curves.setdefault(name, []).append(np.asarray(c))
        for name, s in secs.items():
            seconds.setdefault(name, []).append(s)
        for name, s in scores.items():
            orders.setdefault(name, []).append(np.argsort(s.values, kind="stable").tolist())
        per_seed_scores.append(scores)
    curves = {n: np.stack(v) for n, v in curves.items()}
    full = curves["ablation"][:, 0]
    head = {n: v[:, 1 : half + 1].mean(1) for n, v in curves.items()}  # mean loss k=1..half

    means, bands = common.mean_bands(curves)
    report.plot_curves(
        means,
        out / "removal_curves.png",
        xlabel="steps dropped",
        ylabel="validation loss (nats/byte)",
        baseline=float(full.mean()),
        bands=bands,
        title=f"removal curves, {S}-step model: mean ± std over {len(seeds)} seeds",
    )
    report.plot_profiles(
        per_seed_scores[0],
        out / "profiles.png",
        title=f"block importance by metric, seed {seeds[0]}",
    )

    names = list(curves)
    curve_rows = [[k] + [common.fmt(curves[n][:, k], 3) for n in names] for k in range(1, S)]
    summary = [
        [
            n,
            common.fmt(head[n], 3),
            common.fmt(seconds[n], 1) if n in seconds else "-",
        ]
        for n in names
    ]
    order_rows = [[n] + [" ".join(map(str, o)) for o in orders[n]] for n in orders]
    verdicts = [common.compare(head[n], head[RANDOM], n, RANDOM, 3) for n in names if n != RANDOM]
    verdicts += [
        common.compare(head[n], head["ablation"], n, "ablation", 3)
        for n in names
        if n not in ("ablation", RANDOM)
    ]
    sections = [
        f"Base models: {models[0].config.family}, d_model={models[0].config.d_model}, {S} steps, "
        f"seeds {seeds}; full-model validation loss {common.fmt(full)} nats/byte. Scores on "
        f"{args.score_batches} batches, losses on {args.eval_batches} other batches; shapley: "
        f"{args.shapley_permutations} permutations; random: the mean of {args.random_orders} "
        "random drop orders per seed. Cells: mean ± std [95% t-interval] over the seeds.",
        "## Validation loss after dropping k steps\n\n"
        + common.md_table(["k"] + names, curve_rows),
        f"## Mean loss over k=1..{half} and scoring time\n\n"
        + common.md_table(
            ["metric", f"mean loss k=1..{half}", "score time (s, with compilation)"], summary
        ),
        f"## What the intervals support (mean loss over k=1..{half}, paired by seed, 95%)\n\n"
        + "\n".join(f"- {v}" for v in verdicts),
        "## Drop order (least important first), per seed\n\n"
        + common.md_table(["metric"] + [f"seed {s}" for s in seeds], order_rows),
        "## Scores per step (higher = more important)\n\n"
        + "\n\n".join(
            f"Seed {s}:\n\n```\n" + report.table(sc) + "\n```"
            for s, sc in zip(seeds, per_seed_scores)
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 1: metric comparison",
        sections,
        {
            "seeds": seeds,
            "scores": per_seed_scores,
            "curves": {n: v.tolist() for n, v in curves.items()},
            "seconds": seconds,
            "full": full.tolist(),
            "mean_loss_k1_to_half": {n: v.tolist() for n, v in head.items()},
        },
    )


if __name__ == "__main__":
    main()
