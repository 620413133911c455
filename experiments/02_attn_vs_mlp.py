"""Experiment 2: drop attention sublayers, MLP sublayers, both jointly, or whole blocks.

"What Matters in Transformers? Not All Attention is Needed" (He et al. 2024) finds many
attention sublayers removable with little loss while MLP and whole-block removal hurts
more. Here each unit kind is ranked by two metrics on the scoring batches, leave-one-out
ablation (the loss rise) and the relative contribution |update| / |input| (Csordás et
al. 2025; a trace metric like He et al.'s cosine similarity), and removed least
important first. "joint" ranks all 2 x depth sublayers together (He et al.'s joint
layer drop). Losses are on separate validation batches; the parameter column counts
the block weights a removal takes away.
"""

from __future__ import annotations

import numpy as np

import common
from depthjax import metrics as M
from depthjax.core.model import count_params
from depthjax.pruning import report
from depthjax.pruning.report import pyplot

UNITS = {
    "attn": "attention only",
    "mlp": "MLP only",
    "sublayer": "joint (attn + MLP)",
    "block": "whole blocks",
}


def sublayer_params(model) -> dict[str, int]:
    """Weights of one step's attention and MLP sublayer (norms included)."""
    blocks = model.params["blocks"]
    one = lambda k: count_params(blocks[k]) // model.n_blocks
    attn = sum(one(k) for k in blocks if k.startswith("attn"))
    mlp = sum(one(k) for k in blocks if k.startswith("mlp"))
    return {"attn": attn, "mlp": mlp}


def removed_params(kind: str, order, k: int, S: int, per: dict) -> int:
    if kind == "block":
        return k * (per["attn"] + per["mlp"])
    if kind == "sublayer":
        return sum(per["attn"] if u < S else per["mlp"] for u in order[:k])
    return k * per[kind]


def main(argv=None):
    args = common.parse(common.parser("02_attn_vs_mlp", __doc__), argv, __file__)
    out = common.out_dir(args)
    model = common.base_model(args)
    score_data, data = common.score_batches(args), common.eval_batches(args)
    S, per = model.depth, sublayer_params(model)
    total = S * (per["attn"] + per["mlp"])

    common.log("scoring")
    rel = M.relative_contribution(model, score_data)
    rel_sub = np.concatenate([rel["attn"].values, rel["mlp"].values])
    rankings = {}
    for kind in UNITS:
        rankings[(kind, "ablation")] = M.ablation(model, score_data, unit=kind).values
        rankings[(kind, "relative contribution")] = (
            rel_sub if kind == "sublayer" else rel[kind].values
        )

    common.log("removal curves")
    curves, rows = {}, []
    for (kind, metric), values in rankings.items():
        n = 2 * S if kind == "sublayer" else S
        curve = M.removal_curve(model, data, values, unit=kind, max_units=n - 1)
        curves[f"{UNITS[kind]}, {metric}"] = curve
        order = np.argsort(values, kind="stable")
        for k in range(len(curve)):
            rows.append(
                {
                    "kind": kind,
                    "metric": metric,
                    "removed": k,
                    "params_removed": removed_params(kind, order, k, S, per),
                    "loss": float(curve[k]),
                    "attn_removed": int(np.sum(order[:k] < S))
                    if kind == "sublayer"
                    else (k if kind in ("attn", "block") else 0),
                }
            )
    full = float(curves[f"{UNITS['block']}, ablation"][0])

    # Loss against the share of block weights removed: fair between small and large units.
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ablation", "relative contribution")):
        for kind in UNITS:
            rs = [r for r in rows if r["kind"] == kind and r["metric"] == metric]
            ax.plot(
                [r["params_removed"] / total for r in rs],
                [r["loss"] for r in rs],
                "o-",
                ms=3,
                label=UNITS[kind],
            )
        ax.axhline(full, color="gray", ls=":", lw=1)
        ax.set_xlabel("share of block weights removed")
        ax.set_ylabel("validation loss")
        ax.set_title(f"ranked by {metric}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_params.png", dpi=110)
    plt.close(fig)
    report.plot_curves(
        {k: v[:S] for k, v in curves.items() if "ablation" in k},
        out / "removal_curves.png",
        xlabel="units removed",
        title="ranked by leave-one-out ablation",
        baseline=full,
    )

    def at(kind, metric, k):
        r = [r for r in rows if r["kind"] == kind and r["metric"] == metric and r["removed"] == k]
        return r[0] if r else None

    quarter, half = S // 4, S // 2
    table = []
    for kind in UNITS:
        for metric in ("ablation", "relative contribution"):
            cells = [UNITS[kind], metric]
            for k in (quarter, half):
                r = at(kind, metric, k)
                cells += [f"{r['loss']:.4f} ({100 * r['params_removed'] / total:.0f}%)"]
            table.append(cells)
    joint = [r for r in rows if r["kind"] == "sublayer" and r["metric"] == "ablation"]
    first = [int(r["attn_removed"]) for r in joint[1 : S + 1]]
    sections = [
        f"Base model: {S} steps; per step {per['attn']:,} attention and {per['mlp']:,} MLP "
        f"weights; full-model validation loss {full:.4f}.",
        f"## Validation loss after removing {quarter} and {half} units (share of block "
        "weights removed)\n\n"
        + common.md_table(["units", "ranked by", f"k={quarter}", f"k={half}"], table),
        "## Joint ranking (ablation): attention sublayers among the first k removed\n\n"
        + common.md_table(["k"] + list(range(1, S + 1)), [["attention"] + first]),
        "## Leave-one-out loss rise per step\n\n"
        + common.md_table(
            ["step", "attention", "MLP", "block"],
            [
                [
                    i,
                    float(rankings[("attn", "ablation")][i]),
                    float(rankings[("mlp", "ablation")][i]),
                    float(rankings[("block", "ablation")][i]),
                ]
                for i in range(S)
            ],
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 2: attention vs MLP dropping",
        sections,
        {
            "rows": rows,
            "per_step_params": per,
            "full": full,
            "rankings": {f"{k}/{m}": v for (k, m), v in rankings.items()},
        },
    )


if __name__ == "__main__":
    main()
