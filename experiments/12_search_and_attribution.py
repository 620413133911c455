"""Experiment 12: gradient attribution of depth, and program search against enumeration.

Gates are floats, so d loss / d gate for every attention and MLP gate comes from one
backward pass (a first-order Taylor estimate of each sublayer's ablation, as in Taylor
pruning of channels, Molchanov et al. 2019), and the Hessian of the loss in the gates
estimates every pairwise interaction. On the 8-step base model this script compares:

1. Attribution. Leave-one-out ablation, exact Shapley values (all 2**8 coalitions of
   blocks), sampled Shapley values (plain and antithetic permutations, several keys:
   error against the exact values), the gate gradient and the second-order (gradient +
   Hessian) estimate, by rank correlation, per block and per sublayer; and the Hessian's
   pair interactions against the true second differences of all sublayer pairs,
   L(-i,-j) - L(-i) - L(-j) + L.
2. Search. Every subset of the 8 blocks is scored (255 programs, one batch), so the best
   program of each size is known; each strategy of `dj.search` (drop moves, budget k
   steps) is ranked against that enumeration, with the programs it scored. A search with
   every move (sublayer drops, loops, swaps, parallel groups) shows what lies beyond
   block subsets. Losses on the scoring batches; the found programs are also rescored on
   the validation batches.
3. Per-input programs. A per-example search (drop, sublayer-drop and loop moves) on every
   row of the scoring batches is the oracle; a router (softmax on the mean residual after
   the first k steps) trained on those rows picks one of the most common found programs for
   each validation row. Reported: the gain over the start program of the oracle (searched
   on the validation rows themselves), the best class program per row, the router, and
   the single program best on average (the control a router has to beat).
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np

import common
import depthjax as dj
from depthjax import metrics as M, search


def spearman(a, b) -> float:
    """Rank correlation (no ties expected in these float scores)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(x))) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cpu_timed(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def attribution(model, data, args):
    S = model.depth
    abl_block, t_abl = cpu_timed(lambda: M.ablation(model, data, unit="block"))
    abl_sub, t_abl_sub = cpu_timed(lambda: M.ablation(model, data, unit="sublayer"))
    exact, t_exact = cpu_timed(lambda: M.shapley(model, data, num_permutations=None))
    grad, t_grad = cpu_timed(lambda: M.gate_gradient(model, data))
    H, t_hess = cpu_timed(lambda: M.gate_interactions(model, data))
    g = grad.extra["grad"]
    ones = np.ones(2 * S)
    keep_block = np.ones((S, 2 * S))
    for i in range(S):
        keep_block[i, [i, S + i]] = 0
    taylor1_block = M.taylor_estimate(ones, g, keep_block)
    taylor2_block = M.taylor_estimate(ones, g, keep_block, H)
    taylor2_sub = M.taylor_estimate(ones, g, 1 - np.eye(2 * S), H)
    block = {
        "ablation": abl_block.values,
        "exact Shapley": exact.values,
        "gate gradient": taylor1_block,
        "gradient + Hessian": taylor2_block,
    }
    sub = {
        "ablation": abl_sub.values,
        "gate gradient": grad.values,
        "gradient + Hessian": taylor2_sub,
    }

    # Sampled Shapley against the exact values: plain vs antithetic, same permutation count.
    sampled = {}
    for anti in (False, True):
        errs, ses = [], []
        for k in range(args.shapley_keys):
            est = M.shapley(
                model,
                data,
                num_permutations=args.shapley_permutations,
                key=jax.random.key(100 + k),
                antithetic=anti,
            )
            errs.append(np.sqrt(np.mean((est.values - exact.values) ** 2)))
            ses.append(np.mean(est.extra["stderr"]))
            if k == 0:
                block[
                    f"Shapley, {args.shapley_permutations} perms"
                    + (" (antithetic)" if anti else "")
                ] = est.values
        sampled["antithetic" if anti else "plain"] = (float(np.mean(errs)), float(np.mean(ses)))

    # Pair interactions: true second differences of all sublayer pairs vs the Hessian.
    n = 2 * S
    pairs = list(itertools.combinations(range(n), 2))
    keep = np.ones((1 + n + len(pairs), n), np.int8)
    keep[1 : 1 + n] -= np.eye(n, dtype=np.int8)
    for r, (i, j) in enumerate(pairs):
        keep[1 + n + r, [i, j]] = 0
    L = M.coalition_measures(model, data, "sublayer", keep)
    true_pair = np.array(
        [L[1 + n + r] - L[1 + i] - L[1 + j] + L[0] for r, (i, j) in enumerate(pairs)]
    )
    est_pair = np.array([H[i, j] for i, j in pairs])
    return {
        "block": block,
        "sublayer": sub,
        "sampled": sampled,
        "pairs": (true_pair, est_pair, pairs),
        "cpu_s": {
            "ablation (blocks)": t_abl,
            "ablation (sublayers)": t_abl_sub,
            f"exact Shapley ({1 << S} coalitions)": t_exact,
            "gate gradient": t_grad,
            "gate Hessian": t_hess,
        },
    }


def search_quality(model, data, valid, args):
    S = model.depth
    subsets = [s for r in range(1, S + 1) for s in itertools.combinations(range(S), r)]
    keep = np.zeros((len(subsets), S), np.int8)
    for k, s in enumerate(subsets):
        keep[k, list(s)] = 1
    loss = dict(zip(subsets, M.coalition_measures(model, data, "block", keep)))
    strategies = {
        "greedy": ("greedy", None),
        "greedy, gradient prior, 2 per round": (search.Greedy(max_candidates=2), "gradient"),
        "greedy, Hessian prior, 2 per round": (search.Greedy(max_candidates=2), "hessian"),
        "beam (width 4)": (search.Beam(width=4), None),
        "evolutionary (16 x 8)": (search.Evolutionary(population=16, generations=8), None),
        "MCTS (128 simulations)": (search.MCTS(simulations=128, batch=16), "gradient"),
    }
    rows, found = [], {}
    for k in args.budgets:
        feasible = sorted((s for s in subsets if len(s) <= k), key=loss.get)
        best = feasible[0]
        rows.append(
            [k, "enumeration (all subsets)", len(feasible), 1, f"{loss[best]:.4f}", str(list(best))]
        )
        for name, (strategy, prior) in strategies.items():
            res = search.run(
                model,
                "loss",
                batches=data,
                budget=k,
                moves=("drop",),
                strategy=strategy,
                prior=prior,
                key=jax.random.key(args.seed),
            )
            steps = res.best.candidate.steps
            rank = feasible.index(steps) + 1
            rows.append([k, name, res.evaluated, rank, f"{res.best.score:.4f}", str(list(steps))])
            found[(k, name)] = res
        full = search.run(
            model, "loss", batches=data, budget=k, strategy=search.Beam(width=4), max_depth=S + 1
        )
        found[(k, "beam, every move")] = full
        rows.append(
            [
                k,
                "beam (width 4), every move",
                full.evaluated,
                "-",
                f"{full.best.score:.4f}",
                f"`{full.best.describe()}`",
            ]
        )
    # Held-out check: the enumeration's best and each search's program on validation data.
    held = []
    for k in args.budgets:
        best = min((s for s in subsets if len(s) <= k), key=loss.get)
        enum_valid = M.loss(dj.depth.reorder(model, list(best)), valid)
        for name in ("greedy", "beam (width 4)", "beam, every move"):
            held.append(
                [
                    k,
                    name,
                    f"{found[(k, name)].best.score:.4f}",
                    f"{search.rescore([found[(k, name)].best], 'loss', batches=valid)[0]:.4f}",
                    f"{enum_valid:.4f}",
                ]
            )
    return rows, held, found


def per_input(model, data, valid, args):
    moves = ("drop", "drop_sublayer", "repeat")
    train, test = search.loss(data), search.loss(valid)
    per_train = search.run(model, train, per_example=True, moves=moves)
    per_test = search.run(model, test, per_example=True, moves=moves)
    rows = []
    for k in args.router_k:
        router = search.fit_router(per_train, train, k=k, classes=args.router_classes)
        g = search.routing_gain(router, test, per_test)
        rows.append(
            [
                k,
                g["classes"],
                f"{g['oracle']:.4f}",
                f"{g['class oracle']:.4f}",
                f"{g['router']:.4f}",
                f"{g['single best program']:.4f}",
                f"{g['router share of oracle']:.0%}",
            ]
        )
    return per_train, per_test, rows


def main(argv=None):
    p = common.parser("12_search_and_attribution", __doc__)
    p.add_argument("--shapley-permutations", type=int, default=8)
    p.add_argument(
        "--shapley-keys",
        type=int,
        default=8,
        help="sampled Shapley estimates per estimator (their mean error is reported)",
    )
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[4, 6],
        help="step budgets of the search-vs-enumeration table",
    )
    p.add_argument(
        "--router-k",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        help="routers read the residual after this many steps",
    )
    p.add_argument("--router-classes", type=int, default=8)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    model = common.base_model(args)
    data, valid = common.score_batches(args), common.eval_batches(args)

    common.log("attribution")
    att = attribution(model, data, args)
    names = list(att["block"])
    corr_rows = [
        [a] + [f"{spearman(att['block'][a], att['block'][b]):.2f}" for b in names] for a in names
    ]
    sub_names = list(att["sublayer"])
    sub_rows = [
        [a] + [f"{spearman(att['sublayer'][a], att['sublayer'][b]):.2f}" for b in sub_names]
        for a in sub_names
    ]
    value_rows = [[i] + [f"{att['block'][n][i]:.4f}" for n in names] for i in range(model.depth)]
    true_pair, est_pair, pairs = att["pairs"]
    top = np.argsort(-np.abs(true_pair))[:5]
    unit = lambda u: f"attn_{u}" if u < model.depth else f"mlp_{u - model.depth}"
    pair_rows = [
        [
            f"{unit(pairs[r][0])} + {unit(pairs[r][1])}",
            f"{true_pair[r]:+.4f}",
            f"{est_pair[r]:+.4f}",
        ]
        for r in top
    ]

    common.log("search vs enumeration")
    rows, held, found = search_quality(model, data, valid, args)
    common.log("per-input programs and routers")
    per_train, per_test, router_rows = per_input(model, data, valid, args)

    sections = [
        f"Base model: {model.depth} steps, d_model={model.config.d_model}; scores on "
        f"{args.score_batches} batches of {args.batch_size}x{args.seq_len} tokens, held-out "
        f"check on {args.eval_batches} validation batches.",
        "## Attribution: block scores\n\nLoss rise when a block is removed (ablation), its "
        "exact Shapley value, the first-order estimate from the gate gradient, the "
        "second-order estimate (gradient + Hessian) and sampled Shapley values.\n\n"
        + common.md_table(["step"] + names, value_rows),
        "## Rank correlation (Spearman) between block scores\n\n"
        + common.md_table([""] + names, corr_rows),
        f"## Rank correlation between sublayer scores ({2 * model.depth} units)\n\n"
        + common.md_table([""] + sub_names, sub_rows),
        "## Sampled Shapley against exact\n\n"
        + common.md_table(
            [
                "estimator",
                f"RMS error vs exact ({args.shapley_keys} keys)",
                "mean reported standard error",
            ],
            [[k, f"{e:.5f}", f"{s:.5f}"] for k, (e, s) in att["sampled"].items()],
        ),
        "## Pair interactions\n\n"
        f"All {len(pairs)} pairs of sublayers: true second difference L(-i,-j) - L(-i) - L(-j) "
        f"+ L vs the Hessian entry: Pearson {np.corrcoef(true_pair, est_pair)[0, 1]:.2f}, "
        f"Spearman {spearman(true_pair, est_pair):.2f}. The five largest:\n\n"
        + common.md_table(["pair", "true interaction", "Hessian"], pair_rows),
        "## Cost (CPU seconds on this machine)\n\n"
        + common.md_table(["metric", "CPU s"], [[k, f"{v:.2f}"] for k, v in att["cpu_s"].items()]),
        "## Search vs enumeration (drop moves; loss on the scoring batches)\n\n"
        "Rank: the found program's place among all block subsets within the budget (1 = the "
        "optimum).\n\n"
        + common.md_table(
            ["budget (steps)", "strategy", "programs scored", "rank", "loss", "program"], rows
        ),
        "## Held out\n\n"
        + common.md_table(
            [
                "budget",
                "search",
                "loss (scoring batches)",
                "loss (validation)",
                "enumeration's best, validation",
            ],
            held,
        ),
        "## Per-input programs and a router\n\n"
        f"Per-example search on {len(per_train)} scoring rows: loss "
        f"{per_train.start_scores.mean():.4f} -> {per_train.scores.mean():.4f} "
        f"({len(per_train.counts())} distinct programs); on the {len(per_test)} validation "
        f"rows (the oracle) {per_test.start_scores.mean():.4f} -> {per_test.scores.mean():.4f}. "
        "Loss decrease over the start program on the validation rows:\n\n"
        + common.md_table(
            [
                "router reads residual[k], k",
                "classes",
                "oracle (per-row search)",
                "best class per row",
                "router",
                "single best program",
                "router / oracle",
            ],
            router_rows,
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 12: gradient attribution and program search",
        sections,
        {
            "block_scores": {k: np.asarray(v) for k, v in att["block"].items()},
            "sublayer_scores": {k: np.asarray(v) for k, v in att["sublayer"].items()},
            "pair_true": true_pair,
            "pair_hessian": est_pair,
            "search_rows": rows,
            "held_out": held,
            "router_rows": router_rows,
            "sampled_shapley": att["sampled"],
        },
    )
    k = max(args.budgets)
    found[(k, "beam, every move")].plot(out / "pareto.png")


if __name__ == "__main__":
    main()
