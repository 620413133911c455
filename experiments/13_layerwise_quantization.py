"""Experiment 13: variable layer-wise quantization ordered by importance.

Dumitru et al. 2024 ("Layer-wise quantization") quantize an LLM layer by layer, moving the
least important layers (by an importance ordering) to lower precision, and report that
quality holds until roughly 25-50% of the layers are at the lower width when the ordering
is good, and drops much earlier with a poor ordering.

Here: the base model's table rows start at 8 bits; the k least important rows (k = 0..n)
go to 4 bits (dj.depth.quantize: weight-only, group-wise symmetric integers), for the
orderings block influence, ablation (leave-one-out loss), Shapley (Monte-Carlo), the
reverse of block influence (most important first: a bad ordering), and random orders
(the control: the mean over --random-orders orders). Every figure is over --seeds
trained base models (mean ± std and a 95% interval; orderings compared with random
paired by seed); next-line accuracy at a quarter and a half of the rows low. Scores come
from separate batches (--score-batches) from those the losses are measured on (--eval-batches).
"""

from __future__ import annotations

import jax
import numpy as np

import common
from depthjax import depth, metrics as M
from depthjax.eval import corpus_tasks
from depthjax.pruning import report


def bits_for(order_least_first, k: int, n: int, low: int, high: int) -> np.ndarray:
    """Widths per row: the first k rows of the order at `low` bits, the rest at `high`."""
    bits = np.full(n, high)
    bits[np.asarray(order_least_first)[:k]] = low
    return bits


def row_order(model, scores) -> np.ndarray:
    """Table rows from least to most important (depth.quantize's row importance)."""
    return np.argsort(depth.row_importance(model, scores), kind="stable")


def orderings(model, score_data, args, seed: int) -> dict[str, np.ndarray]:
    """Table rows from least to most important by each ordering (random ones separately)."""
    scores = dict(M.trace_metrics(model, score_data))
    orders = {
        "block influence": row_order(model, scores["block_influence"]),
        "ablation": row_order(model, M.ablation(model, score_data, unit="block")),
        "shapley": row_order(
            model,
            M.shapley(
                model,
                score_data,
                unit="block",
                num_permutations=args.shapley_permutations,
                key=jax.random.key(seed),
            ),
        ),
    }
    orders["reverse (block influence)"] = orders["block influence"][::-1]
    return orders


def main(argv=None):
    p = common.parser("13_layerwise_quantization", __doc__)
    p.add_argument("--low", type=int, default=4, help="the lower bit width")
    p.add_argument("--high", type=int, default=8, help="the width the other rows keep")
    p.add_argument("--group-size", type=int, default=32, help="inputs per scale")
    p.add_argument("--task-examples", type=int, default=100, help="next-line examples")
    common.ordering_flags(p)
    args = common.parse(p, argv, __file__)
    out, score_data, data = (
        common.out_dir(args),
        common.score_batches(args),
        common.eval_batches(args),
    )
    models = common.base_models(args)
    seeds = common.seed_list(args)
    n = models[0].n_blocks
    task = corpus_tasks.next_line(args.task_examples, seed=args.seed)
    quantized = lambda model, order, k: depth.quantize(
        model, bits_for(order, k, n, args.low, args.high), group_size=args.group_size
    )
    # Task accuracy where the paper places the knee: a quarter and a half of the rows low.
    task_ks = sorted({n // 4, n // 2})

    curves, accs, full, full_acc, orders_by_seed = {}, {}, [], [], []  # [seeds, k] per name
    for seed, model in zip(seeds, models):
        orders = orderings(model, score_data, args, seed)
        rng = np.random.default_rng(seed)
        randoms = [rng.permutation(n) for _ in range(args.random_orders)]
        full.append(common.loss(model, data))
        full_acc.append(task.evaluate(model)["acc_norm"])
        for name, order in orders.items():
            curves.setdefault(name, []).append(
                [common.loss(quantized(model, order, k), data) for k in range(n + 1)]
            )
            accs.setdefault(name, []).append(
                [task.evaluate(quantized(model, order, k))["acc_norm"] for k in task_ks]
            )
            common.log(f"seed {seed} {name}: {np.round(curves[name][-1], 4).tolist()}")
        # The random control: its mean over random orders, one value per seed.
        rc = [[common.loss(quantized(model, o, k), data) for k in range(n + 1)] for o in randoms]
        curves.setdefault("random", []).append(np.mean(rc, 0))
        ra = [[task.evaluate(quantized(model, o, k))["acc_norm"] for k in task_ks] for o in randoms]
        accs.setdefault("random", []).append(np.mean(ra, 0))
        orders_by_seed.append({k: np.asarray(v).tolist() for k, v in orders.items()})
    curves = {k: np.asarray(v) for k, v in curves.items()}  # [seeds, n+1]
    accs = {k: np.asarray(v) for k, v in accs.items()}  # [seeds, len(task_ks)]

    means = {k: v.mean(0) for k, v in curves.items()}
    bands = {
        k: (v.mean(0) - v.std(0, ddof=1), v.mean(0) + v.std(0, ddof=1)) for k, v in curves.items()
    }
    report.plot_curves(
        means,
        out / "loss_vs_fraction.png",
        xlabel=f"rows at {args.low} bits (of {n}; the rest at {args.high})",
        title=f"Layer-wise quantization: mean ± std over {len(seeds)} seeds",
        baseline=float(np.mean(full)),
        bands=bands,
    )
    low_q = depth.quantize(models[0], args.low, group_size=args.group_size)
    high_q = depth.quantize(models[0], args.high, group_size=args.group_size)
    sizes = [depth.table_bytes(m) for m in (models[0], high_q, low_q)]
    packed = depth.table_bytes(low_q, packed=True)

    ks = sorted({n // 4, n // 2, 3 * n // 4, n})
    loss_rows = [[name] + [common.fmt(v[:, k]) for k in ks] for name, v in curves.items()]
    acc_rows = [
        [name] + [common.fmt(v[:, i], 3) for i in range(len(task_ks))] for name, v in accs.items()
    ]
    verdicts = []
    for name in curves:
        if name == "random":
            continue
        for k in ks[:2]:
            d = curves[name][:, k] - curves["random"][:, k]
            word = (
                "separates from"
                if common.separated(curves[name][:, k], curves["random"][:, k])
                else "is not resolved against"
            )
            verdicts.append(
                f"- {name}, {k}/{n} rows low: loss minus random's {common.fmt(d)}; "
                f"it {word} the random control."
            )
    sections = [
        f"Base: {models[0].depth} steps, {len(seeds)} trained models (seeds {seeds}); unquantized "
        f"validation loss {common.fmt(full)}, next-line accuracy {common.fmt(full_acc, 3)}. "
        f"Orderings from {args.score_batches} score batches, losses on {args.eval_batches} "
        "other batches; "
        f"random = the mean over {args.random_orders} random orders per seed. Group size "
        f"{args.group_size}; figures are mean ± std [95% interval] over seeds.",
        f"Table bytes: float {sizes[0]:,}; all rows at {args.high} bits {sizes[1]:,}; all at "
        f"{args.low} bits {sizes[2]:,} ({packed:,} if 4-bit integers were packed two per byte).",
        "## Validation loss by rows at low precision\n\n"
        + common.md_table(["ordering"] + [f"{k}/{n}" for k in ks], loss_rows),
        f"## Next-line accuracy ({args.task_examples} examples, length-normalized)\n\n"
        + common.md_table(["ordering"] + [f"{k}/{n}" for k in task_ks], acc_rows),
        "## What the intervals support (paired by seed, 95%)\n\n" + "\n".join(verdicts),
        "![loss against rows at low precision](loss_vs_fraction.png)",
    ]
    common.write_results(
        args,
        out,
        "Experiment 13: layer-wise quantization by importance",
        sections,
        {
            "seeds": seeds,
            "full": full,
            "full_acc": full_acc,
            "curves": {k: v.tolist() for k, v in curves.items()},
            "task_ks": task_ks,
            "acc": {k: v.tolist() for k, v in accs.items()},
            "orders": orders_by_seed,
            "table_bytes": {
                "float": sizes[0],
                f"{args.high}bit": sizes[1],
                f"{args.low}bit": sizes[2],
                f"{args.low}bit_packed": packed,
            },
        },
    )


if __name__ == "__main__":
    main()
