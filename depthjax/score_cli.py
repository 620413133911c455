"""`depthjax score` and `depthjax prune` on a native checkpoint or a local HF directory.

    depthjax score --model DIR [--out REPORT_DIR] [--batches 4] [--batch-size 8] [--seq-len 128]
    depthjax prune --model DIR --metric block_influence --n 2 [--unit block]
                   [--recover bias|linear|lora] [--rank 8] --out CKPT

Calibration and evaluation text comes from the embedded corpus (Python standard library
sources: train split to score and calibrate, validation split to evaluate).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _data_args(p):
    p.add_argument("--model", required=True, help="native checkpoint or Hugging Face directory")
    p.add_argument("--batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


def _load(args):
    from . import checkpoint, corpus
    model = checkpoint.load_model(args.model)
    tok = checkpoint.tokenizer_for(args.model, model)
    window = lambda split, seed: corpus.sample_windows(args.batch_size, args.seq_len, seed=seed,
                                                       split=split, encode=tok.encode)
    calib = [window("train", args.seed + i) for i in range(args.batches)]
    evals = [window("valid", args.seed + 1000 + i) for i in range(args.batches)]
    print(f"[data] {args.batches} x {args.batch_size} x {args.seq_len} tokens of stdlib "
          f"source (train to score, valid to evaluate)", flush=True)
    return model, calib, evals


def _score(args) -> int:
    import jax

    from . import report
    model, calib, evals = _load(args)
    print(f"[score] {model!r}".splitlines()[0], flush=True)
    scores = report.score_all(model, calib, shapley_permutations=args.shapley_permutations,
                              key=jax.random.key(args.seed))
    curves = report.removal_curves(model, evals, scores, "block", max_units=args.max_remove)
    print(report.table(scores, "block"))
    print("\nvalidation loss after removing k blocks (least important first):")
    for name, ys in curves.items():
        print(f"  {name:<28} " + " ".join(f"{y:.3f}" for y in ys))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.write_json({"scores": scores, "removal_curves": curves}, out / "scores.json")
        report.plot_profiles(scores, out / "profiles.png", title=f"{args.model}")
        report.plot_curves(curves, out / "removal_curves.png", xlabel="blocks removed",
                           ylabel="validation loss", baseline=curves[next(iter(curves))][0])
        print(f"wrote {out}/scores.json, profiles.png, removal_curves.png")
    return 0


def _metric(name: str, unit: str, calib, args):
    """model -> Scores ranking `unit` by metric `name`."""
    import jax
    import numpy as np

    from . import metrics as M
    if name in ("block_influence", "angular_distance") and unit != "block":
        raise SystemExit(f"--metric {name} scores whole blocks; use --unit block, or ablation, "
                         "shapley or relative_contribution for sublayers")
    if name == "relative_contribution":
        def contribution(m):
            rc = M.relative_contribution(m, calib)
            if unit != "sublayer":
                return rc[unit]
            return M.Scores("relative_contribution", "sublayer",
                            np.concatenate([rc["attn"].values, rc["mlp"].values]))
        return contribution
    return {"block_influence": lambda m: M.block_influence(m, calib),
            "angular_distance": lambda m: M.angular_distance(m, calib),
            "ablation": lambda m: M.ablation(m, calib, unit=unit),
            "shapley": lambda m: M.shapley(m, calib, unit=unit, key=jax.random.key(args.seed),
                                           num_permutations=args.shapley_permutations)}[name]


def _prune(args) -> int:
    import depthjax as dj
    from . import checkpoint, metrics as M
    model, calib, evals = _load(args)
    metric = _metric(args.metric, args.unit, calib, args)
    scores = None if args.iterative else metric(model)
    pruned = dj.prune(model, scores, args.n, unit=args.unit, metric=metric, iterative=args.iterative)
    loss = lambda m: M.loss(m, evals)
    print(f"validation loss: full {loss(model):.4f}  pruned {loss(pruned):.4f}", flush=True)
    if args.recover:
        pruned = dj.recover(pruned, model, calib, method=args.recover, rank=args.rank,
                            steps=args.lora_steps, log_every=max(1, args.lora_steps // 10))
        print(f"validation loss after {args.recover} recovery: {loss(pruned):.4f}")
    print(pruned.program)
    checkpoint.save(pruned, args.out)
    print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="score every step with every metric; table, JSON, plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(p)
    p.add_argument("--out", help="report directory (scores.json, profiles.png, removal_curves.png)")
    p.add_argument("--shapley-permutations", type=int, default=8)
    p.add_argument("--max-remove", type=int, default=None, help="removal curves up to k blocks")
    p.set_defaults(func=_score)

    p = sub.add_parser("prune", help="remove the n least important units, optionally recover",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(p)
    p.add_argument("--metric", default="block_influence",
                   choices=["block_influence", "angular_distance", "relative_contribution",
                            "ablation", "shapley"])
    p.add_argument("--n", type=int, required=True, help="units to remove")
    p.add_argument("--unit", default="block", choices=["block", "attn", "mlp", "sublayer"])
    p.add_argument("--iterative", action="store_true", help="re-score after each removal")
    p.add_argument("--recover", choices=["bias", "linear", "lora"])
    p.add_argument("--rank", type=int, default=None, help="rank for linear / lora recovery")
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--shapley-permutations", type=int, default=8)
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    p.set_defaults(func=_prune)
