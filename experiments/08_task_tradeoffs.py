"""Experiment 8: which blocks matter depends on the task.

The seed paper (Shapley-value depth pruning) reports that block importance computed for
one task helps that task and can hurt another, and that attention sublayers can be dropped
with little damage. Here, on a model trained on the embedded corpus, measures score every
block and every attention sublayer by leave-one-out ablation (--methods; Monte-Carlo
Shapley values too with `--methods ablation,shapley`): multiple-choice tasks built from
held-out corpus files (--tasks: `next_line`, local; `identifier_recall`, long-range;
measured by the gold choice's cross-entropy, a smooth stand-in for accuracy) and the
next-token loss. The model is pruned by each ranking (blocks, then attention sublayers
only) and every pruned model is evaluated on every measure: the cross-task table (pruned
for A, evaluated on B). The full model is evaluated on both tasks, to show whether each is
above chance. Accuracy is
length-normalized (`acc_norm`, the log-likelihood per character, as lm-evaluation-harness
reports it): the candidate lines differ in length, and the summed log-likelihood (`acc`)
mostly picks the shortest one.

Every figure is over --seeds base models (mean ± std [95% t-interval]); the tasks' examples
are the same for every seed, and settings are compared paired by seed. A task whose full-
model accuracy interval does not exclude chance (0.25, four choices) supports no conclusion.
"""

from __future__ import annotations

import jax
import numpy as np

import common
import depthjax as dj
from depthjax import metrics as M
from depthjax.eval import corpus_tasks
from depthjax.pruning.choose import choose
from depthjax.pruning.report import pyplot

TASKS = ("next_line", "identifier_recall")
CHANCE = 0.25  # four choices per example


def main(argv=None):
    p = common.parser("08_task_tradeoffs", __doc__)
    p.add_argument("--task-examples", type=int, default=50, help="examples per task")
    p.add_argument(
        "--tasks",
        default="next_line",
        help=f"tasks to prune for and evaluate every pruned model on, of {', '.join(TASKS)} "
        "(the full model is evaluated on all of them)",
    )
    p.add_argument("--methods", default="ablation", help="ablation and/or shapley")
    p.add_argument("--shapley-permutations", type=int, default=8)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    seeds = list(range(args.seed, args.seed + args.seeds))
    models = common.base_models(args)
    score_data, data = common.score_batches(args), common.eval_batches(args)
    methods = [m for m in args.methods.split(",") if m]
    used = [t for t in args.tasks.split(",") if t]
    metrics = (*used, "loss")
    tasks = {
        name: getattr(corpus_tasks, name)(args.task_examples, seed=args.seed) for name in TASKS
    }
    scorers = {
        name: dj.eval.MultipleChoice(tasks[name].examples, name=name, metric="nll") for name in used
    }

    def evaluate(m, names=used):
        row = {name: tasks[name].evaluate(m)["acc_norm"] for name in names}
        return {**row, "loss": common.loss(m, data)}

    S = models[0].depth
    units = (("block", max(1, S // 4)), ("attn", max(1, S // 2)))
    full = {k: [] for k in (*TASKS, "loss")}
    scores, pruned = {}, {}  # key "unit/source/method" -> [seeds, S]; -> metric -> [seeds]
    for seed, model in zip(seeds, models):
        for k, v in evaluate(model, TASKS).items():
            full[k].append(v)
        common.log(f"seed {seed} full model: " + ", ".join(f"{k} {full[k][-1]:.4f}" for k in full))
        for unit, n in units:
            for source in metrics:
                measure = scorers.get(source, "loss")
                batches = score_data if source == "loss" else None
                for method in methods:
                    if method == "ablation":
                        s = M.ablation(model, batches, unit=unit, measure=measure)
                    else:
                        s = M.shapley(
                            model,
                            batches,
                            unit=unit,
                            measure=measure,
                            key=jax.random.key(seed),
                            num_permutations=args.shapley_permutations,
                        )
                    key = f"{unit}/{source}/{method}"
                    ev = evaluate(dj.prune(model, s, n, unit=unit))
                    scores.setdefault(key, []).append(np.asarray(s.values))
                    r = pruned.setdefault(key, {"removed": [], **{k: [] for k in metrics}})
                    r["removed"].append(choose(model, s, n, unit).tolist())
                    for k in metrics:
                        r[k].append(ev[k])
                    common.log(f"seed {seed} {key}: removed {r['removed'][-1]}, {ev}")

    sections = [
        f"{S}-step base models, {len(seeds)} seeds ({seeds}); {args.task_examples} examples per "
        f"task (the same for every seed), scores: {', '.join(methods)} (Shapley: "
        f"{args.shapley_permutations} permutations). Figures are mean ± std [95% t-interval] "
        "over seeds; accuracy is length-normalized (acc_norm), chance is 0.25.",
        "## Full model\n\n"
        + "\n".join(
            f"- {t} acc_norm {common.fmt(full[t], 3)}: "
            + (
                "above chance."
                if len(seeds) > 1 and common.spread(full[t])[2][0] > CHANCE
                else "the interval does not exclude chance (0.25); no conclusion from this task."
            )
            for t in TASKS
        )
        + f"\n- validation loss {common.fmt(full['loss'])}",
    ]
    for unit, n in units:
        what = f"{n} of {S} blocks" if unit == "block" else f"{n} of {S} attention sublayers"
        rows = [
            [
                source,
                method,
                " / ".join(",".join(map(str, r)) for r in pruned[key]["removed"]),
                *(common.fmt(pruned[key][k], 4 if k == "loss" else 3) for k in metrics),
            ]
            for source in metrics
            for method in methods
            for key in [f"{unit}/{source}/{method}"]
        ]
        full_row = [
            "(full model)",
            "",
            "",
            *(common.fmt(full[k], 4 if k == "loss" else 3) for k in metrics),
        ]
        sections.append(
            f"## Pruning {what}: accuracy on each task, validation loss\n\n"
            + common.md_table(
                [
                    "pruned for",
                    "scores",
                    "removed (per seed)",
                    *(f"{t} acc_norm" for t in used),
                    "loss",
                ],
                [full_row, *rows],
            )
        )
        sections.append(
            f"### Pruned for one measure against another, {what} (paired by seed, 95%)\n\n"
            + "\n".join(verdicts(pruned, unit, methods, metrics))
        )
    sections.append(
        "## Rank correlation of the scores between measures (Spearman, per seed)\n\n"
        + correlations(scores, methods, metrics)
    )
    plot_scores(scores, S, out / "scores.png")
    sections.append("![per-task scores (mean over seeds)](scores.png)")
    res = {"seeds": seeds, "full": full, "scores": scores, "pruned": pruned}
    common.write_results(args, out, "Experiment 8: task-dependent block importance", sections, res)
    return res


def verdicts(pruned: dict, unit: str, methods, metrics) -> list[str]:
    """For each measure: the model pruned for it against those pruned for the others,
    evaluated on that measure (accuracy: higher is better; loss: lower is better)."""
    lines = []
    for method in methods:
        for own in metrics:
            for other in metrics:
                if other != own:
                    a = pruned[f"{unit}/{own}/{method}"][own]
                    b = pruned[f"{unit}/{other}/{method}"][own]
                    lines.append(
                        common.compared(
                            f"{method}, on {own}: pruned for {own} - pruned for {other}",
                            a,
                            b,
                            4 if own == "loss" else 3,
                        )
                    )
    return lines


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(x)) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def correlations(scores: dict, methods, metrics) -> str:
    """Spearman correlation of the per-unit scores between each pair of measures."""
    pairs = [(a, b) for i, a in enumerate(metrics) for b in metrics[i + 1 :]]
    rows = [
        [f"{unit}, {method}"]
        + [
            common.fmt(
                [
                    spearman(x, y)
                    for x, y in zip(scores[f"{unit}/{a}/{method}"], scores[f"{unit}/{b}/{method}"])
                ],
                2,
            )
            for a, b in pairs
        ]
        for unit in ("block", "attn")
        for method in methods
    ]
    return common.md_table(["units, scores", *(f"{a} ~ {b}" for a, b in pairs)], rows)


def plot_scores(scores: dict, S: int, path) -> None:
    """Each measure's scores across depth, scaled to max |score| 1 per seed, mean over seeds."""
    plt = pyplot()
    panels = sorted({tuple(k.split("/")[::2]) for k in scores}, reverse=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (unit, method) in zip(axes[0], panels):
        for key, values in scores.items():
            u, source, m = key.split("/")
            if (u, m) == (unit, method):
                v = np.asarray(values, float)
                v = v / np.maximum(np.abs(v).max(1, keepdims=True), 1e-12)
                ax.plot(np.arange(S), v.mean(0), "o-", ms=3, label=source)
        ax.set_title(f"{method} of {unit} (scaled, mean over seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
