"""Experiment 15: stitching two anchors of different widths into a family of models.

Pan et al. 2023 ("Stitchable Neural Networks", SN-Net) join the first blocks of one
pretrained model to the last blocks of another of a different width through a linear
stitching layer (initialized by least squares, then fine-tuned), and report that the
stitched models fill the cost/quality range between the two anchors.

Here: two anchors of --layers steps, of d_model --widths (small, large), are trained on the
embedded corpus (one run each). For each direction (small -> large and large -> small) and
every stitching point k = 1 .. layers - 1, `dj.depth.stitch(a, b, at=k)` fits the map on
--calib-batches calibration batches of the training split (least squares; resume at the
same relative depth), then fine-tunes the map alone for --tune-steps steps on the same
batches. Each stitched model's validation loss is plotted against its forward FLOPs per
token. Calibration sets are drawn with --calib-seeds seeds: every figure is the mean +- std
over them, with a 95% t interval; the anchors are one training run each.
"""

from __future__ import annotations

import jax
import numpy as np

import common
import depthjax as dj
from depthjax.core.flops import forward_flops_per_token
from depthjax.core.loss import nll_sums
from depthjax.files.corpus import sample_windows
from depthjax.pruning import report

T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}


@jax.jit
def _nll(model, tokens):
    return nll_sums(dj.apply(model, tokens), tokens)


def loss(model, data) -> float:
    """Mean next-token loss over the validation batches (any model, stitched ones too)."""
    sums = [_nll(model, t) for t in data]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


def calibration(batch_size: int, seq_len: int, *, seed: int, batches: int) -> list:
    """Calibration set `seed`: `batches` windows [batch_size, seq_len] of the training split."""
    return [sample_windows(batch_size, seq_len, seed=5000 + 100 * seed + i) for i in range(batches)]


def stat(xs) -> dict:
    xs = np.asarray(xs, float)
    n = len(xs)
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    half = T975.get(n, 1.96) * std / np.sqrt(n) if n > 1 else 0.0
    return {"mean": float(xs.mean()), "std": std, "ci95": [xs.mean() - half, xs.mean() + half]}


def pareto(points) -> list[int]:
    """Indices of the points (flops, loss) no other point beats on both axes."""
    keep = []
    for i, (f, y) in enumerate(points):
        if not any(g <= f and m <= y and (g, m) != (f, y) for g, m in points):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def plot(path, anchors, stitched, seq_len):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = {"small -> large": "o", "large -> small": "s"}
    for direction, rows in stitched.items():
        for tuned, color in (("fitted", "tab:blue"), ("tuned", "tab:orange")):
            xs = [r["flops"] / 1e6 for r in rows]
            ys = [r[tuned]["mean"] for r in rows]
            err = [r[tuned]["std"] for r in rows]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                fmt=markers[direction],
                color=color,
                ms=5,
                capsize=2,
                alpha=0.85,
                label=f"{direction}, {'least squares' if tuned == 'fitted' else '+ tuned map'}",
            )
            for r in rows:
                ax.annotate(f"k={r['at']}", (r["flops"] / 1e6, r[tuned]["mean"]), fontsize=6)
    for name, a in anchors.items():
        ax.plot(a["flops"] / 1e6, a["loss"], "*", ms=13, color="black")
        ax.annotate(
            name,
            (a["flops"] / 1e6, a["loss"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    pts = [(a["flops"], a["loss"]) for a in anchors.values()] + [
        (r["flops"], r["tuned"]["mean"]) for rows in stitched.values() for r in rows
    ]
    front = pareto(pts)
    ax.plot(
        [pts[i][0] / 1e6 for i in front],
        [pts[i][1] for i in front],
        "k:",
        lw=1,
        label="Pareto front (anchors + tuned)",
    )
    ax.set_xlabel(f"forward MFLOPs per token (seq_len {seq_len})")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(
        "Stitched models between two anchors (mean +- std over calibration seeds)", fontsize=9
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = common.parser("15_stitching", __doc__, layers=4, steps=400)
    p.add_argument("--widths", default="64,128", help="d_model of the small and large anchor")
    p.add_argument("--calib-seeds", type=int, default=3, help="calibration sets (spread)")
    p.add_argument("--calib-batches", type=int, default=4, help="batches per calibration set")
    p.add_argument("--tune-steps", type=int, default=50, help="Adam steps on the map alone")
    p.add_argument("--tune-lr", type=float, default=1e-3)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)
    small_w, large_w = (int(w) for w in args.widths.split(","))
    models = {}
    for name, width in (("small", small_w), ("large", large_w)):
        over = common.model_overrides(args, d_model=width)
        models[name] = common.trained(
            args, f"stitch-{name}", common.train_config(args, model_overrides=over)
        )
    anchors = {}
    for name, m in models.items():
        anchors[f"{name} (d_model {m.config.d_model})"] = {
            "loss": loss(m, data),
            "flops": forward_flops_per_token(m.config, args.seq_len, m.program),
            "params": m.n_params,
        }
        common.log(
            f"anchor {name}: loss {anchors[f'{name} (d_model {m.config.d_model})']['loss']:.4f}"
        )

    calib = [
        calibration(args.batch_size, args.seq_len, seed=s, batches=args.calib_batches)
        for s in range(args.calib_seeds)
    ]
    stitched = {}
    for direction, (a, b) in {
        "small -> large": (models["small"], models["large"]),
        "large -> small": (models["large"], models["small"]),
    }.items():
        rows = []
        for k in range(1, a.depth):
            fitted, tuned = [], []
            for s in range(args.calib_seeds):
                st = dj.depth.stitch(a, b, at=k, calibration=calib[s])
                fitted.append(loss(st, data))
                st = dj.depth.tune_map(st, calib[s], args.tune_steps, args.tune_lr)
                tuned.append(loss(st, data))
            row = {
                "at": k,
                "resume": st.resume,
                "flops": st.flops_per_token(args.seq_len),
                "fitted": stat(fitted),
                "tuned": stat(tuned),
                "fitted_runs": fitted,
                "tuned_runs": tuned,
            }
            rows.append(row)
            common.log(
                f"{direction} k={k} resume={st.resume}: fitted {row['fitted']['mean']:.4f} "
                f"+- {row['fitted']['std']:.4f}, tuned {row['tuned']['mean']:.4f} "
                f"+- {row['tuned']['std']:.4f}"
            )
        stitched[direction] = rows

    plot(out / "pareto.png", anchors, stitched, args.seq_len)
    fmt = lambda st: (
        f"{st['mean']:.4f} +- {st['std']:.4f} [{st['ci95'][0]:.4f}, {st['ci95'][1]:.4f}]"
    )
    table = [
        [name, "-", f"{a['flops'] / 1e6:.3f}", f"{a['loss']:.4f} (one run)", "-"]
        for name, a in anchors.items()
    ]
    for direction, rows in stitched.items():
        table += [
            [
                direction,
                f"{r['at']} / {r['resume']}",
                f"{r['flops'] / 1e6:.3f}",
                fmt(r["fitted"]),
                fmt(r["tuned"]),
            ]
            for r in rows
        ]
    sections = [
        f"Anchors: {args.layers} steps each, d_model {small_w} and {large_w}, {args.steps} "
        f"training steps of {args.batch_size}x{args.seq_len} tokens (one run each). Maps fitted "
        f"on {args.calib_batches} calibration batches of the training split per seed, tuned for "
        f"{args.tune_steps} Adam steps (lr {args.tune_lr}); losses on {args.eval_batches} "
        "validation batches.",
        f"## Validation loss against cost (mean +- std [95% t interval] over {args.calib_seeds} "
        "calibration seeds)\n\n"
        + common.md_table(
            ["model", "at / resume", "MFLOPs/token", "least squares", "+ tuned map"], table
        ),
        "![Pareto plot](pareto.png)",
    ]
    common.write_results(
        args,
        out,
        "Experiment 15: stitching two anchors of different widths",
        sections,
        {"anchors": anchors, "stitched": stitched, "calib_seeds": args.calib_seeds},
    )


if __name__ == "__main__":
    main()
