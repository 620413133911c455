"""Experiment 16: recovery methods compared after depth pruning, over base-model seeds.

Minitron-style pipelines prune depth and then heal the pruned model by distilling from the
unpruned one; depthjax offers four ways to heal (`dj.recover`): closed-form adapters that
emulate the removed units ("bias": their mean update; "linear": a rank-r least-squares map
of their input), LoRA on the pruned program trained on the next-token loss ("lora"), and
the same LoRA trained to match the full program's next-token distribution ("distill": KL at
temperature 1, the teacher is the same table walked by the full program).

For each base seed (a model trained by common.py, cached by its config): prune 25% of the
blocks by block influence, and separately 25% of the attention sublayers by leave-one-out
ablation of the loss (both scored on the score batches), then heal with each method. Every
method sees the same calibration tokens (--calib-batches windows of the training split);
"lora" and "distill" train the same LoRA rank for the same --recover-steps Adam steps over
those batches (equal steps and tokens). Measured on the validation batches (next-token
loss) and on the `next_line` corpus task (length-normalized accuracy, --task-examples held-out
examples, the same examples for every model). Figures are mean +- std over the seeds with a
95% t-interval of the mean; differences between methods are also given paired by seed.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

import common
import depthjax as dj
from depthjax import metrics as M
from depthjax.eval import corpus_tasks
from depthjax.files.corpus import sample_windows
from depthjax.pruning.report import pyplot

METHODS = ("none", "bias", "linear", "lora", "distill")


def interval(xs) -> dict:
    """mean, std (ddof 1) and the 95% t-interval of the mean over seeds (common.spread)."""
    mean, std, ci95 = common.spread(xs)
    return {"mean": mean, "std": std, "ci95": list(ci95), "n": len(xs)}


def fmt(s: dict, digits: int = 4) -> str:
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def separated(a: dict, b: dict) -> bool:
    return a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0]


def same_structure(models: dict) -> dict:
    """The models with every per-step entry any of them has ("steps", "final_adapter"), zero
    where a model lacks it: a zero LoRA or adapter adds exact zeros, so each model computes
    the same numbers, and all of them share one compiled scorer per depth (the loss and
    task scorers compile per parameter structure)."""
    flat = {
        k: traverse_util.flatten_dict(
            {e: m.params[e] for e in ("steps", "final_adapter") if e in m.params}
        )
        for k, m in models.items()
    }
    union = {}
    for f in flat.values():
        union.update({path: x for path, x in f.items() if path not in union})
    out = {}
    for k, m in models.items():
        full = {path: flat[k].get(path, np.zeros(x.shape, x.dtype)) for path, x in union.items()}
        out[k] = m.replace(params={**m.params, **traverse_util.unflatten_dict(full)})
    return out


def main(argv=None):
    p = common.parser("16_recovery_methods", __doc__)
    p.add_argument("--fraction", type=float, default=0.25, help="of blocks / attn sublayers")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration windows batches")
    p.add_argument("--recover-steps", type=int, default=100, help="Adam steps, lora + distill")
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (lora and distill)")
    p.add_argument("--linear-rank", type=int, default=16)
    p.add_argument("--task-examples", type=int, default=200)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data, score_data = common.eval_batches(args), common.score_batches(args)
    calib = [
        sample_windows(args.batch_size, args.seq_len, seed=3000 + i, split="train")
        for i in range(args.calib_batches)
    ]
    task = corpus_tasks.next_line(args.task_examples, seed=0)
    seeds = list(range(args.seed, args.seed + args.seeds))
    settings = ("block", "attn")
    raw = {u: {m: {"loss": [], "task": []} for m in METHODS} for u in settings}
    full = {"loss": [], "task": []}
    removed = {u: [] for u in settings}

    def measure(m):
        return common.loss(m, data), float(task.evaluate(m)["acc_norm"])

    for seed, model in zip(seeds, common.base_models(args)):
        loss, acc = measure(model)
        full["loss"].append(loss)
        full["task"].append(acc)
        common.log(f"seed {seed}: full model loss {loss:.4f}, next_line {acc:.3f}")
        n = max(1, round(args.fraction * model.depth))
        for unit in settings:
            if unit == "block":
                scores = M.block_influence(model, score_data)
            else:
                scores = M.ablation(model, score_data, unit="attn")
            pruned = dj.prune(model, scores, n, unit=unit)
            gone = (
                sorted(set(range(model.depth)) - set(np.asarray(pruned.program.block).tolist()))
                if unit == "block"
                else np.flatnonzero(np.asarray(pruned.program.attn) == 0).tolist()
            )
            removed[unit].append(gone)
            healed = {}
            for method in METHODS:
                if method == "none":
                    healed[method] = pruned
                    continue
                rank = {"bias": None, "linear": args.linear_rank}.get(method, args.rank)
                healed[method] = dj.recover(
                    pruned,
                    model,
                    calib,
                    method=method,
                    rank=rank,
                    lora_steps=args.recover_steps,
                    learning_rate=args.recover_lr,
                )
            for method, m in same_structure(healed).items():
                loss, acc = measure(m)
                raw[unit][method]["loss"].append(loss)
                raw[unit][method]["task"].append(acc)
                common.log(
                    f"seed {seed} {unit} {gone} {method}: loss {loss:.4f}, next_line {acc:.3f}"
                )

    summary = {
        u: {m: {k: interval(v) for k, v in raw[u][m].items()} for m in METHODS} for u in settings
    }
    paired = {  # distill minus each other method, per seed
        u: {
            m: {
                k: interval(np.subtract(raw[u]["distill"][k], raw[u][m][k]))
                for k in ("loss", "task")
            }
            for m in METHODS
            if m != "distill"
        }
        for u in settings
    }
    full_s = {k: interval(v) for k, v in full.items()}
    n_seeds = len(seeds)
    sections = [
        f"Base: {args.model}, {args.layers} steps, {args.steps} training steps per seed "
        f"(seeds {seeds}). Pruned: {args.fraction:.0%} of the blocks (block influence) or of "
        f"the attention sublayers (ablation of the loss). Calibration: {args.calib_batches} "
        f"batches of {args.batch_size}x{args.seq_len} training tokens for every method; lora "
        f"and distill: rank {args.rank}, {args.recover_steps} Adam steps at lr "
        f"{args.recover_lr}; linear: rank {args.linear_rank}. Cells: mean ± std [95% "
        f"t-interval of the mean] over {n_seeds} seeds.",
        f"Full model: validation loss {fmt(full_s['loss'])}, next_line acc_norm "
        f"{fmt(full_s['task'], 3)}.",
    ]
    for u in settings:
        what = "blocks" if u == "block" else "attention sublayers"
        rows = [[m, fmt(summary[u][m]["loss"]), fmt(summary[u][m]["task"], 3)] for m in METHODS]
        sections.append(
            f"## {args.fraction:.0%} of the {what} removed (per seed: {removed[u]})\n\n"
            + common.md_table(["recovery", "validation loss", "next_line acc_norm"], rows)
        )
        rows = [
            [f"distill - {m}", fmt(paired[u][m]["loss"]), fmt(paired[u][m]["task"], 3)]
            for m in METHODS
            if m != "distill"
        ]
        sections.append(
            "Paired by seed (distill minus the other method; below 0 means distill has the "
            "lower loss):\n\n" + common.md_table(["difference", "loss", "acc_norm"], rows)
        )
        sections.append(conclusions(u, summary[u], paired[u]))
    plot(summary, out / "recovery_methods.png", n_seeds)
    sections.append("![recovery methods](recovery_methods.png)")
    common.write_results(
        args,
        out,
        "Experiment 16: recovery methods after depth pruning",
        sections,
        {
            "seeds": seeds,
            "raw": raw,
            "full": full,
            "removed": removed,
            "summary": summary,
            "paired_distill_minus": paired,
            "full_summary": full_s,
        },
    )


def conclusions(unit: str, summary: dict, paired: dict) -> str:
    """Which loss orderings the intervals support, computed (never hand-written)."""
    lines = []
    for m in METHODS:
        if m == "distill":
            continue
        d = paired[m]["loss"]
        sep = separated(summary["distill"]["loss"], summary[m]["loss"])
        if d["ci95"][1] < 0:
            verdict = "distill has the lower loss (paired interval below 0)"
        elif d["ci95"][0] > 0:
            verdict = f"{m} has the lower loss (paired interval above 0)"
        else:
            verdict = "not resolved at this scale (paired interval contains 0)"
        lines.append(
            f"* distill vs {m}: {verdict}; the per-method intervals "
            f"{'separate' if sep else 'overlap'}."
        )
    return f"Conclusions ({unit}, validation loss):\n\n" + "\n".join(lines)


def plot(summary: dict, path, n_seeds: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (unit, title) in zip(axes, (("block", "blocks"), ("attn", "attention sublayers"))):
        mean = [summary[unit][m]["loss"]["mean"] for m in METHODS]
        lo = [mu - summary[unit][m]["loss"]["ci95"][0] for mu, m in zip(mean, METHODS)]
        hi = [summary[unit][m]["loss"]["ci95"][1] - mu for mu, m in zip(mean, METHODS)]
        ax.bar(METHODS, mean, yerr=[lo, hi], capsize=4, color="tab:blue", alpha=0.7)
        ax.set_ylim(min(mean) - 2 * max(lo), max(mean) + 2 * max(hi))
        ax.set_title(f"{title} pruned")
        ax.set_ylabel("validation loss")
    fig.suptitle(f"recovery methods: mean and 95% interval over {n_seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
