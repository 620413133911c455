"""Experiment 5: run middle layers in parallel instead of dropping them.

"Transformer Layers as Painters" (Sun et al. 2024) runs a span of middle layers in
parallel on one shared input and averages their outputs, and finds this degrades far
less than skipping the span; "Make Deep Networks Shallow Again" (Bermeitinger et al.
2023) argues that residual stacks behave close to a shallow, parallel arrangement of
their blocks. No training here: the trained base model is evaluated (validation loss)
with

* pairs: k disjoint pairs of adjacent middle steps made parallel, summing their updates
  (x + f(x) + g(x), the first-order residual expansion) or averaging them (Painters),
  against dropping the second step of every pair (the same sequential depth) and
  dropping both;
* spans: one centred span of w middle steps run in parallel (mean and sum) against
  dropping the whole span (Painters' skip baseline).
"""

from __future__ import annotations

import common
from depthjax import depth
from depthjax.pruning import report
from depthjax.pruning.report import pyplot


def middle_pairs(S: int, k: int) -> list[list[int]]:
    """k disjoint adjacent pairs around the middle, first and last step excluded."""
    starts = sorted(range(1, S - 2, 2), key=lambda s: (abs(s + 1 - S / 2), s))[:k]
    return [[s, s + 1] for s in sorted(starts)]


def centred_span(S: int, w: int) -> list[int]:
    start = (S - w) // 2
    return list(range(start, start + w))


def main(argv=None):
    args = common.parse(common.parser("05_parallel_layers", __doc__), argv, __file__)
    out = common.out_dir(args)
    model = common.base_model(args)
    data = common.eval_batches(args)
    S = model.depth
    full = common.loss(model, data)
    common.log(f"full model loss {full:.4f}")

    pair_rows, pair_curves = (
        [],
        {
            k: []
            for k in ("parallel (sum)", "parallel (mean)", "drop one of each pair", "drop both")
        },
    )
    max_pairs = len(range(1, S - 2, 2))
    for k in range(1, max_pairs + 1):
        pairs = middle_pairs(S, k)
        variants = {
            "parallel (sum)": depth.parallelize(model, pairs, combine="sum"),
            "parallel (mean)": depth.parallelize(model, pairs, combine="mean"),
            "drop one of each pair": depth.drop(model, [p[1] for p in pairs]),
            "drop both": depth.drop(model, [s for p in pairs for s in p]),
        }
        res = {name: common.loss(m, data) for name, m in variants.items()}
        for name, v in res.items():
            pair_curves[name].append(v)
        pair_rows.append([k, str(pairs), S - k] + [res[n] for n in pair_curves])
        common.log(f"{k} pairs {pairs}: " + ", ".join(f"{n} {v:.4f}" for n, v in res.items()))

    span_rows, span_curves = [], {k: [] for k in ("parallel (mean)", "parallel (sum)", "drop span")}
    for w in range(2, S - 1):
        span = centred_span(S, w)
        variants = {
            "parallel (mean)": depth.parallelize(model, [span], combine="mean"),
            "parallel (sum)": depth.parallelize(model, [span], combine="sum"),
            "drop span": depth.drop(model, span),
        }
        res = {name: common.loss(m, data) for name, m in variants.items()}
        for name, v in res.items():
            span_curves[name].append(v)
        span_rows.append([w, f"{span[0]}..{span[-1]}"] + [res[n] for n in span_curves])
        common.log(
            f"span {span[0]}..{span[-1]}: " + ", ".join(f"{n} {v:.4f}" for n, v in res.items())
        )

    report.plot_curves(
        {n: [full] + v for n, v in pair_curves.items()},
        out / "pairs.png",
        xlabel="middle pairs changed",
        baseline=full,
        title="parallel pairs vs dropping",
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ws = list(range(2, S - 1))
    for n, v in span_curves.items():
        ax.plot(ws, v, "o-", ms=3, label=n)
    ax.axhline(full, color="gray", ls=":", lw=1, label="full model")
    ax.set_xlabel("width of the centred middle span")
    ax.set_ylabel("validation loss")
    ax.set_title("one middle span: parallel vs skipped", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "spans.png", dpi=110)
    plt.close(fig)

    sections = [
        f"Base model: {S} steps, full-model validation loss {full:.4f}.",
        "## Middle pairs\n\n"
        + common.md_table(["pairs", "steps", "sequential depth"] + list(pair_curves), pair_rows),
        "## One centred span\n\n"
        + common.md_table(["width", "steps"] + list(span_curves), span_rows),
    ]
    common.write_results(
        args,
        out,
        "Experiment 5: parallel layers",
        sections,
        {"full": full, "pairs": pair_rows, "spans": span_rows},
    )


if __name__ == "__main__":
    main()
