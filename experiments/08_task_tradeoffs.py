"""Experiment 8: which blocks matter depends on the task.

The seed paper (Shapley-value depth pruning) reports that block importance computed for
one task helps that task and can hurt another, and that attention sublayers can be dropped
with little damage. Here, on a model trained on the embedded corpus, three measures score
every block and every attention sublayer by leave-one-out ablation and by Monte-Carlo
Shapley values: two multiple-choice tasks built from held-out corpus files
(`next_line`: local; `identifier_recall`: long-range; measured by the gold choice's cross-
entropy, a smooth stand-in for accuracy) and the next-token loss. The model is pruned by
each ranking (blocks, then attention sublayers only) and every pruned model is evaluated
on every task: the cross-task table (pruned for A, evaluated on B). Accuracy is
length-normalized (`acc_norm`, the log-likelihood per character, as lm-evaluation-harness
reports it): the candidate lines differ in length, and the summed log-likelihood (`acc`)
mostly picks the shortest one.
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


def main(argv=None):
    p = common.parser("08_task_tradeoffs", __doc__)
    p.add_argument("--task-examples", type=int, default=100, help="examples per task")
    p.add_argument("--shapley-permutations", type=int, default=8)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    model = common.base_model(args)
    score_data, data = common.score_batches(args), common.eval_batches(args)
    tasks = {
        "next_line": corpus_tasks.next_line(args.task_examples, seed=args.seed),
        "identifier_recall": corpus_tasks.identifier_recall(args.task_examples, seed=args.seed),
    }
    scorers = {
        name: dj.eval.MultipleChoice(t.examples, name=name, metric="nll")
        for name, t in tasks.items()
    }

    def evaluate(m):
        row = {name: t.evaluate(m)["acc_norm"] for name, t in tasks.items()}
        return {**row, "loss": common.loss(m, data)}

    full = evaluate(model)
    common.log("full model: " + ", ".join(f"{k} {v:.4f}" for k, v in full.items()))
    S = model.depth
    res = {"full": full, "scores": {}, "pruned": {}}
    sections = []
    for unit, n in (("block", max(1, S // 4)), ("attn", max(1, S // 2))):
        rows = []
        for source in ("next_line", "identifier_recall", "loss"):
            measure = scorers.get(source, "loss")
            batches = score_data if source == "loss" else None
            for method in ("ablation", "shapley"):
                common.log(f"{method} of {unit} units by {source}")
                if method == "ablation":
                    s = M.ablation(model, batches, unit=unit, measure=measure)
                else:
                    s = M.shapley(
                        model,
                        batches,
                        unit=unit,
                        measure=measure,
                        key=jax.random.key(args.seed),
                        num_permutations=args.shapley_permutations,
                    )
                pruned = dj.prune(model, s, n, unit=unit)
                ev = evaluate(pruned)
                key = f"{unit}/{source}/{method}"
                res["scores"][key] = s.values
                res["pruned"][key] = {"removed": choose(model, s, n, unit).tolist(), **ev}
                rows.append(
                    [
                        source,
                        method,
                        res["pruned"][key]["removed"],
                        ev["next_line"],
                        ev["identifier_recall"],
                        ev["loss"],
                    ]
                )
        what = f"{n} of {S} blocks" if unit == "block" else f"{n} of {S} attention sublayers"
        sections.append(
            f"## Pruning {what}: length-normalized accuracy on each task, validation loss\n\n"
            + common.md_table(
                [
                    "pruned for",
                    "scores",
                    "removed",
                    "next_line acc_norm",
                    "identifier_recall acc_norm",
                    "loss",
                ],
                [
                    [
                        "(full model)",
                        "",
                        "",
                        full["next_line"],
                        full["identifier_recall"],
                        full["loss"],
                    ]
                ]
                + rows,
            )
        )
    plot_scores(res["scores"], S, out / "scores.png")
    sections.append("![per-task scores](scores.png)")
    common.write_results(args, out, "Experiment 8: task-dependent block importance", sections, res)
    return res


def plot_scores(scores: dict, S: int, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (unit, method) in zip(
        axes, [(u, m) for u in ("block", "attn") for m in ("ablation", "shapley")]
    ):
        for key, values in scores.items():
            u, source, m = key.split("/")
            if (u, m) == (unit, method):
                v = np.asarray(values, float)
                ax.plot(np.arange(S), v / (np.abs(v).max() or 1.0), "o-", ms=3, label=source)
        ax.set_title(f"{method} of {unit} (scaled)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
