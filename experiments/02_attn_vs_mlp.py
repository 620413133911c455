"""Experiment 2: drop attention sublayers, MLP sublayers, both jointly, or whole blocks.

"What Matters in Transformers? Not All Attention is Needed" (He et al. 2024) finds many
attention sublayers removable with little loss while MLP and whole-block removal hurts
more. Here each unit kind is ranked by two metrics on the scoring batches, leave-one-out
ablation (the loss rise) and the relative contribution |update| / |input| (Csordás et
al. 2025; a trace metric like He et al.'s cosine similarity), and removed least
important first. "joint" ranks all 2 x depth sublayers together (He et al.'s joint
layer drop). Losses are on separate validation batches; the parameter column counts
the block weights a removal takes away.

All of this is repeated on each of the --seeds trained base models; every loss is
reported as mean ± std [95% t-interval] over the seeds, and every comparison (attention
against MLP, joint against whole blocks) by the interval of its per-seed differences.
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
METRICS = ("ablation", "relative contribution")


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


def rank_units(model, score_data) -> dict:
    """(kind, metric) -> importance of every unit of that kind (higher = more important)."""
    rel = M.relative_contribution(model, score_data)
    rel_sub = np.concatenate([rel["attn"].values, rel["mlp"].values])
    rankings = {}
    for kind in UNITS:
        rankings[(kind, "ablation")] = M.ablation(model, score_data, unit=kind).values
        rankings[(kind, "relative contribution")] = (
            rel_sub if kind == "sublayer" else rel[kind].values
        )
    return rankings


def curves_of(model, data, rankings, per) -> tuple[dict, dict, dict]:
    """Removal curve, share of block weights removed and attention sublayers removed, per k,
    of every ranking (keyed like `rankings`)."""
    S = model.depth
    total = S * (per["attn"] + per["mlp"])
    curves, shares, attn = {}, {}, {}
    for (kind, metric), values in rankings.items():
        n = 2 * S if kind == "sublayer" else S
        curve = M.removal_curve(model, data, values, unit=kind, max_units=n - 1)
        order = np.argsort(values, kind="stable")
        ks = range(len(curve))
        curves[(kind, metric)] = np.asarray(curve)
        shares[(kind, metric)] = np.array(
            [removed_params(kind, order, k, S, per) / total for k in ks]
        )
        attn[(kind, metric)] = np.array(
            [
                int(np.sum(order[:k] < S))
                if kind == "sublayer"
                else (k if kind in ("attn", "block") else 0)
                for k in ks
            ]
        )
    return curves, shares, attn


def main(argv=None):
    args = common.parse(common.parser("02_attn_vs_mlp", __doc__), argv, __file__)
    out, score_data, data = (
        common.out_dir(args),
        common.score_batches(args),
        common.eval_batches(args),
    )
    models, seeds = common.base_models(args), common.seed_list(args)
    S, per = models[0].depth, sublayer_params(models[0])
    keys = [(kind, metric) for kind in UNITS for metric in METRICS]

    rankings, curves, shares, attn = {}, {}, {}, {}  # key -> [seed, ...]
    for seed, model in zip(seeds, models):
        common.log(f"seed {seed}: scoring")
        r = rank_units(model, score_data)
        common.log(f"seed {seed}: removal curves")
        c, s, a = curves_of(model, data, r, per)
        for key in keys:
            for store, v in ((rankings, r), (curves, c), (shares, s), (attn, a)):
                store.setdefault(key, []).append(v[key])
    rankings, curves, shares, attn = (
        {k: np.stack(v) for k, v in d.items()} for d in (rankings, curves, shares, attn)
    )
    full = curves[("block", "ablation")][:, 0]
    label = lambda key: f"{UNITS[key[0]]}, {key[1]}"

    # Loss against the share of block weights removed: fair between small and large units.
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, METRICS):
        for kind in UNITS:
            x, y = shares[(kind, metric)].mean(0), curves[(kind, metric)]
            (line,) = ax.plot(x, y.mean(0), "o-", ms=3, label=UNITS[kind])
            sd = y.std(0, ddof=1) if len(seeds) > 1 else np.zeros_like(x)
            ax.fill_between(x, y.mean(0) - sd, y.mean(0) + sd, color=line.get_color(), alpha=0.15)
        ax.axhline(full.mean(), color="gray", ls=":", lw=1)
        ax.set_xlabel("share of block weights removed (mean over seeds)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"ranked by {metric}: mean ± std over {len(seeds)} seeds", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_params.png", dpi=110)
    plt.close(fig)
    means, bands = common.mean_bands(
        {label(k): curves[k][:, :S] for k in keys if k[1] == "ablation"}
    )
    report.plot_curves(
        means,
        out / "removal_curves.png",
        xlabel="units removed",
        title=f"ranked by leave-one-out ablation: mean ± std over {len(seeds)} seeds",
        baseline=float(full.mean()),
        bands=bands,
    )

    quarter, half = S // 4, S // 2
    table = [
        [UNITS[kind], metric]
        + [
            f"{common.fmt(curves[(kind, metric)][:, k], 3)}; "
            f"{100 * shares[(kind, metric)][:, k].mean():.0f}%"
            for k in (quarter, half)
        ]
        for kind, metric in keys
    ]
    verdicts = []
    for metric in METRICS:
        for k in (quarter, half):
            c = {kind: curves[(kind, metric)][:, k] for kind in UNITS}
            verdicts += [
                f"{k} removed, ranked by {metric}: " + common.compare(c[a], c[b], a, b, 3)
                for a, b in (("attn", "mlp"), ("sublayer", "block"), ("attn", "block"))
            ]
    rise = {kind: rankings[(kind, "ablation")] for kind in ("attn", "mlp", "block")}
    rise_rows = [[i] + [common.fmt(rise[kind][:, i], 3) for kind in rise] for i in range(S)]
    step_verdicts = [
        f"step {i}: "
        + common.compare(rise["attn"][:, i], rise["mlp"][:, i], "attn", "mlp", 3, "loss rise")
        for i in range(S)
    ]
    first = attn[("sublayer", "ablation")][:, 1 : S + 1]
    sections = [
        f"Base models: {S} steps, seeds {seeds}; per step {per['attn']:,} attention and "
        f"{per['mlp']:,} MLP weights; full-model validation loss {common.fmt(full)}. Cells: "
        "mean ± std [95% t-interval] over the seeds.",
        f"## Validation loss after removing {quarter} and {half} units; share of block "
        "weights removed (mean over seeds)\n\n"
        + common.md_table(["units", "ranked by", f"k={quarter}", f"k={half}"], table),
        "## What the intervals support (paired by seed, 95%; attn = attention only, mlp = "
        "MLP only, sublayer = joint, block = whole blocks)\n\n"
        + "\n".join(f"- {v}" for v in verdicts),
        "## Joint ranking (ablation): attention sublayers among the first k removed, per seed\n\n"
        + common.md_table(
            ["seed"] + list(range(1, S + 1)), [[s] + row.tolist() for s, row in zip(seeds, first)]
        ),
        "## Leave-one-out loss rise per step\n\n"
        + common.md_table(["step", "attention", "MLP", "block"], rise_rows),
        "Attention against MLP of the same step (paired by seed, 95%):\n\n"
        + "\n".join(f"- {v}" for v in step_verdicts),
    ]
    common.write_results(
        args,
        out,
        "Experiment 2: attention vs MLP dropping",
        sections,
        {
            "seeds": seeds,
            "per_step_params": per,
            "full": full.tolist(),
            **{
                name: {f"{k}/{m}": v.tolist() for (k, m), v in store.items()}
                for name, store in (
                    ("curves", curves),
                    ("shares", shares),
                    ("attn_removed", attn),
                    ("rankings", rankings),
                )
            },
        },
    )


if __name__ == "__main__":
    main()
