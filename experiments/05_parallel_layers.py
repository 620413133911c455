"""Experiment 5: run middle layers in parallel instead of dropping them.

"Transformer Layers as Painters" (Sun et al. 2024) runs a span of middle layers in
parallel on one shared input and averages their outputs, and finds this degrades far
less than skipping the span; "Make Deep Networks Shallow Again" (Bermeitinger et al.
2023) argues that residual stacks behave close to a shallow, parallel arrangement of
their blocks. No training here: each of the --seeds trained base models is evaluated
(validation loss) with

* pairs: k disjoint pairs of adjacent middle steps made parallel, summing their updates
  (x + f(x) + g(x), the first-order residual expansion) or averaging them (Painters),
  against dropping the second step of every pair (the same sequential depth) and
  dropping both;
* spans: one centred span of w middle steps run in parallel (mean and sum) against
  dropping the whole span (Painters' skip baseline).

Every loss is reported as mean ± std [95% t-interval] over the seeds, and every
comparison by the interval of its per-seed differences.
"""

from __future__ import annotations

import numpy as np

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


PAIR_NAMES = ("parallel (sum)", "parallel (mean)", "drop one of each pair", "drop both")
SPAN_NAMES = ("parallel (mean)", "parallel (sum)", "drop span")


def pair_variants(model, pairs) -> dict:
    return {
        "parallel (sum)": depth.parallelize(model, pairs, combine="sum"),
        "parallel (mean)": depth.parallelize(model, pairs, combine="mean"),
        "drop one of each pair": depth.drop(model, [p[1] for p in pairs]),
        "drop both": depth.drop(model, [s for p in pairs for s in p]),
    }


def span_variants(model, span) -> dict:
    return {
        "parallel (mean)": depth.parallelize(model, [span], combine="mean"),
        "parallel (sum)": depth.parallelize(model, [span], combine="sum"),
        "drop span": depth.drop(model, span),
    }


def main(argv=None):
    args = common.parse(common.parser("05_parallel_layers", __doc__), argv, __file__)
    out, data = common.out_dir(args), common.eval_batches(args)
    models, seeds = common.base_models(args), common.seed_list(args)
    S = models[0].depth
    n_pairs = len(range(1, S - 2, 2))
    widths = list(range(2, S - 1))
    full = []
    pair_loss = {n: np.zeros((len(seeds), n_pairs)) for n in PAIR_NAMES}  # [seed, k - 1]
    span_loss = {n: np.zeros((len(seeds), len(widths))) for n in SPAN_NAMES}  # [seed, w - 2]
    for i, (seed, model) in enumerate(zip(seeds, models)):
        full.append(common.loss(model, data))
        common.log(f"seed {seed}: full model loss {full[-1]:.4f}")
        for k in range(1, n_pairs + 1):
            pairs = middle_pairs(S, k)
            for name, m in pair_variants(model, pairs).items():
                pair_loss[name][i, k - 1] = common.loss(m, data)
            common.log(
                f"seed {seed}, {k} pairs {pairs}: "
                + ", ".join(f"{n} {pair_loss[n][i, k - 1]:.4f}" for n in PAIR_NAMES)
            )
        for j, w in enumerate(widths):
            span = centred_span(S, w)
            for name, m in span_variants(model, span).items():
                span_loss[name][i, j] = common.loss(m, data)
            common.log(
                f"seed {seed}, span {span[0]}..{span[-1]}: "
                + ", ".join(f"{n} {span_loss[n][i, j]:.4f}" for n in SPAN_NAMES)
            )

    full_mean = float(np.mean(full))
    means, bands = common.mean_bands(
        {n: np.concatenate([np.array(full)[:, None], v], 1) for n, v in pair_loss.items()}
    )
    report.plot_curves(
        means,
        out / "pairs.png",
        xlabel="middle pairs changed",
        baseline=full_mean,
        bands=bands,
        title=f"parallel pairs vs dropping: mean ± std over {len(seeds)} seeds",
    )
    means, bands = common.mean_bands(span_loss)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in SPAN_NAMES:
        (line,) = ax.plot(widths, means[n], "o-", ms=3, label=n)
        ax.fill_between(widths, *bands[n], color=line.get_color(), alpha=0.15)
    ax.axhline(full_mean, color="gray", ls=":", lw=1, label="full model")
    ax.set_xlabel("width of the centred middle span")
    ax.set_ylabel("validation loss")
    ax.set_title(f"one middle span: parallel vs skipped ({len(seeds)} seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "spans.png", dpi=110)
    plt.close(fig)

    pair_rows = [
        [k, str(middle_pairs(S, k)), S - k]
        + [common.fmt(pair_loss[n][:, k - 1], 3) for n in PAIR_NAMES]
        for k in range(1, n_pairs + 1)
    ]
    span_rows = [
        [w, f"{centred_span(S, w)[0]}..{centred_span(S, w)[-1]}"]
        + [common.fmt(span_loss[n][:, j], 3) for n in SPAN_NAMES]
        for j, w in enumerate(widths)
    ]
    verdicts = []
    for k in range(1, n_pairs + 1):
        v = {n: pair_loss[n][:, k - 1] for n in PAIR_NAMES}
        verdicts += [
            f"{k} pairs: " + common.compare(v[a], v[b], a, b, 3)
            for a, b in (
                ("parallel (sum)", "drop one of each pair"),
                ("parallel (mean)", "drop one of each pair"),
                ("parallel (sum)", "parallel (mean)"),
            )
        ]
    for j, w in enumerate(widths):
        v = {n: span_loss[n][:, j] for n in SPAN_NAMES}
        verdicts += [
            f"span of {w}: " + common.compare(v[a], v[b], a, b, 3)
            for a, b in (
                ("parallel (sum)", "drop span"),
                ("parallel (mean)", "drop span"),
                ("parallel (sum)", "parallel (mean)"),
            )
        ]
    sections = [
        f"Base models: {S} steps, seeds {seeds}; full-model validation loss "
        f"{common.fmt(full)}. Cells: mean ± std [95% t-interval] over the seeds.",
        "## Middle pairs\n\n"
        + common.md_table(["pairs", "steps", "sequential depth"] + list(PAIR_NAMES), pair_rows),
        "## One centred span\n\n"
        + common.md_table(["width", "steps"] + list(SPAN_NAMES), span_rows),
        "## What the intervals support (paired by seed, 95%)\n\n"
        + "\n".join(f"- {v}" for v in verdicts),
    ]
    common.write_results(
        args,
        out,
        "Experiment 5: parallel layers",
        sections,
        {
            "seeds": seeds,
            "full": full,
            "pairs": {str(k): middle_pairs(S, k) for k in range(1, n_pairs + 1)},
            "pair_loss": {n: v.tolist() for n, v in pair_loss.items()},
            "widths": widths,
            "span_loss": {n: v.tolist() for n, v in span_loss.items()},
        },
    )


if __name__ == "__main__":
    main()
