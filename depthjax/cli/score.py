"""`depthjax score`: every metric on a native checkpoint or a local HF directory.

    depthjax score --model DIR [--out REPORT_DIR] [--data FILES] [--task TASK.jsonl]
                   [--batches 4] [--batch-size 8] [--seq-len 128]

Calibration and evaluation text comes from --data (the user's files, split 80/20) or the
embedded corpus (Python standard library sources: train split to score, validation split
for the removal curves). Ablation, Shapley values and removal curves measure the --task
(1 - accuracy of a multiple-choice file, ...) or, without one, the next-token loss; an
encoder (BERT, sentence-transformers) is measured by the cosine of its pooled embeddings
to the full model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_data_args, add_quiet_arg, check_out_dir, count, load_with_data, natural


def _score(args) -> int:
    import jax

    from ..pruning import report

    if args.out:
        check_out_dir(args.out)
    data = load_with_data(args)
    model = data.model
    print(f"[score] {model!r}".splitlines()[0], flush=True)
    scores = report.score_all(
        model,
        data.calib,
        shapley_permutations=args.shapley_permutations,
        key=jax.random.key(args.seed),
        measure=data.measure(data.calib),
    )
    measure = data.measure(data.evals)
    curves = report.removal_curves(
        model, data.evals, scores, "block", max_units=args.max_remove, measure=measure
    )
    what = report.measure_label(measure)
    print(report.table(scores, "block"))
    print(f"\n{what} after removing k blocks (least important first):")
    for name, ys in curves.items():
        print(f"  {name:<28} " + " ".join(f"{y:.3f}" for y in ys))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(
            {"scores": scores, "removal_curves": curves, "measure": what}, out / "scores.json"
        )
        report.plot_profiles(scores, out / "profiles.png", title=f"{args.model}")
        report.plot_curves(
            curves,
            out / "removal_curves.png",
            xlabel="blocks removed",
            ylabel=what,
            baseline=curves[next(iter(curves))][0],
        )
        print(f"wrote {out}/scores.json, profiles.png, removal_curves.png")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score every step with every metric; table, JSON, plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    p.add_argument("--out", help="report directory (scores.json, profiles.png, removal_curves.png)")
    p.add_argument(
        "--shapley-permutations",
        type=count,
        default=None,
        help="sampled (antithetic) Shapley permutations; default: exact when the "
        "2**n coalitions are at most 4096, else 16",
    )
    p.add_argument("--max-remove", type=natural, default=None, help="removal curves up to k blocks")
    add_quiet_arg(p)
    p.set_defaults(func=_score)
