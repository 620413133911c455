"""Experiment 13: variable layer-wise quantization ordered by importance.

Dumitru et al. 2024 ("Layer-wise quantization") quantize an LLM layer by layer, moving the
least important layers (by an importance ordering) to lower precision, and report that
quality holds until roughly 25-50% of the layers are at the lower width when the ordering
is good, and drops much earlier with a poor ordering.

Here: the base model's table rows start at 8 bits; the k least important rows (k = 0..n)
go to 4 bits (dj.depth.quantize: weight-only, group-wise symmetric integers), for the
orderings block influence, ablation (leave-one-out loss), Shapley (Monte-Carlo), the
reverse of block influence (most important first: a bad ordering), and random orders
(the control: mean and spread over --random-orders orders). Scores come from separate
batches (--score-batches) from those the losses are measured on (--eval-batches).
"""

from __future__ import annotations

import jax
import numpy as np

import common
from depthjax import depth, metrics as M
from depthjax.pruning import report


def bits_for(order_least_first, k: int, n: int, low: int, high: int) -> np.ndarray:
    """Widths per row: the first k rows of the order at `low` bits, the rest at `high`."""
    bits = np.full(n, high)
    bits[np.asarray(order_least_first)[:k]] = low
    return bits


def row_order(model, scores) -> np.ndarray:
    """Table rows from least to most important (depth.quantize's row importance)."""
    return np.argsort(depth.row_importance(model, scores), kind="stable")


def main(argv=None):
    p = common.parser("13_layerwise_quantization", __doc__)
    p.add_argument("--low", type=int, default=4, help="the lower bit width")
    p.add_argument("--high", type=int, default=8, help="the width the other rows keep")
    p.add_argument("--group-size", type=int, default=32, help="inputs per scale")
    common.ordering_flags(p)
    args = common.parse(p, argv, __file__)
    out, model, score_data, data = common.scored_base(args)
    n = model.n_blocks

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
                key=jax.random.key(args.seed),
            ),
        ),
    }
    orders["reverse (block influence)"] = orders["block influence"][::-1]
    rng = np.random.default_rng(args.seed)
    randoms = [rng.permutation(n) for _ in range(args.random_orders)]

    def curve(order):
        return np.array(
            [
                common.loss(
                    depth.quantize(
                        model,
                        bits_for(order, k, n, args.low, args.high),
                        group_size=args.group_size,
                    ),
                    data,
                )
                for k in range(n + 1)
            ]
        )

    full = common.loss(model, data)
    curves = {}
    for name, order in orders.items():
        curves[name] = curve(order)
        common.log(f"{name}: {np.round(curves[name], 4).tolist()}")
    random_curves = np.stack([curve(o) for o in randoms])
    mean, spread = random_curves.mean(0), random_curves.std(0, ddof=1 if len(randoms) > 1 else 0)
    curves[f"random (mean of {len(randoms)})"] = mean
    low_q = depth.quantize(model, args.low, group_size=args.group_size)
    high_q = depth.quantize(model, args.high, group_size=args.group_size)
    sizes = [depth.table_bytes(m) for m in (model, high_q, low_q)]
    packed = depth.table_bytes(low_q, packed=True)

    report.plot_curves(
        curves,
        out / "loss_vs_fraction.png",
        xlabel=f"rows at {args.low} bits (of {n}; the rest at {args.high})",
        title="Layer-wise quantization: which rows go to low precision first",
        baseline=full,
        bands={f"random (mean of {len(randoms)})": (mean - spread, mean + spread)},
    )
    headers = ["ordering"] + [f"{k}/{n}" for k in range(n + 1)]
    rows = [[name] + list(c) for name, c in curves.items()]
    rows.append(["random: std"] + list(spread))
    sections = [
        f"Base: {model.depth} steps, validation loss {full:.4f} unquantized (one trained "
        f"model, seed {args.seed}; orderings from {args.score_batches} score batches, losses on "
        f"{args.eval_batches} other batches). Group size {args.group_size}.",
        f"Table bytes: float {sizes[0]:,}; all rows at {args.high} bits {sizes[1]:,}; all at "
        f"{args.low} bits {sizes[2]:,} ({packed:,} if 4-bit integers were packed two per byte).",
        "## Validation loss by rows at low precision\n\n" + common.md_table(headers, rows),
        "Each ordering is one run on one trained model; only the random control has a spread "
        "(standard deviation over its random orders).",
    ]
    common.write_results(
        args,
        out,
        "Experiment 13: layer-wise quantization by importance",
        sections,
        {
            "full": full,
            "curves": {k: v.tolist() for k, v in curves.items()},
            "random_curves": random_curves.tolist(),
            "random_std": spread.tolist(),
            "orders": {k: np.asarray(v).tolist() for k, v in orders.items()},
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
