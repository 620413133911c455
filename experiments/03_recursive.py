"""Experiment 3: recursive conversion of a trained model (tie, relax, uptrain).

"Relaxed Recursive Transformers" (Bae et al. 2024) turns a pretrained model into a
recursive one: its L layers become K < L shared blocks looped L/K times, initialized
from the original layers (Stepwise: every (L/K)-th layer; Average: the mean of the
layers tied together; Lower: the first K), then relaxes the ties with per-layer LoRA
initialized from the truncated SVD of (original - shared) weights, and uptrains briefly.
They report that the converted models recover most of the original's quality and beat
vanilla models of the same size trained from scratch.

Here: the base model's S steps are tied to K blocks with the cycle strategy (step i runs
block i mod K) and each init, the stepwise tie is relaxed at several LoRA ranks, and
each variant is uptrained with depthjax.train for a few steps. The from-scratch
reference is a K-layer model (same block-table size) trained for the uptraining budget
and for the base budget plus the uptraining budget.
"""

from __future__ import annotations

from pathlib import Path

import common
import depthjax as dj
from depthjax import depth


def main(argv=None):
    p = common.parser("03_recursive", __doc__)
    p.add_argument("--unique", type=int, default=None, help="shared blocks K (default depth/2)")
    p.add_argument("--ranks", default="4,16", help="LoRA ranks for relax, comma-separated")
    p.add_argument("--uptrain-steps", type=int, default=100)
    p.add_argument("--uptrain-lr", type=float, default=1e-3)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)
    base_tc = common.train_config(args)
    base = common.trained(args, "base", base_tc)
    S = base.depth
    K = args.unique or S // 2
    ranks = [int(r) for r in args.ranks.split(",") if r]

    variants = {
        f"tie {init}": depth.tie(base, K, strategy="cycle", init=init)
        for init in ("stepwise", "average", "lower")
    }
    for r in ranks:
        variants[f"relax r={r}"] = depth.relax(variants["tie stepwise"], base, rank=r)
    full_rank = depth.relax(variants["tie stepwise"], base, rank="full")

    rows, result = [], {}
    base_loss = common.loss(base, data)
    full_rank_loss = common.loss(full_rank, data)
    common.log(
        f"base loss {base_loss:.4f}; relax at full rank {full_rank_loss:.4f} (reproduces the base)"
    )
    variant_root = Path(args.cache) / "variants" / common.cached_run_dir(args, "base", base_tc).name
    for name, model in variants.items():
        before = common.loss(model, data)
        init_dir = variant_root / name.replace(" ", "-").replace("=", "")
        if not (init_dir / "config.json").exists():
            dj.save(model, init_dir)
        tc = common.train_config(
            args,
            model_overrides={},
            init_from=str(init_dir),
            steps=args.uptrain_steps,
            lr=args.uptrain_lr,
            seed=args.seed + 1,
        )
        after = common.loss(common.trained(args, "uptrain-" + init_dir.name, tc), data)
        result[name] = {"params": model.n_params, "before": before, "after": after}
        rows.append([name, f"{model.n_params:,}", before, after])
        common.log(f"{name}: loss {before:.4f} -> {after:.4f} after {args.uptrain_steps} steps")

    small = lambda steps: common.train_config(
        args, model_overrides=common.model_overrides(args, n_layers=K), steps=steps
    )
    for label, steps in (
        ("uptraining budget", args.uptrain_steps),
        ("base + uptraining budget", args.steps + args.uptrain_steps),
    ):
        model = common.trained(args, f"scratch{K}", small(steps))
        name = f"{K}-layer from scratch, {steps} steps ({label})"
        loss = common.loss(model, data)
        result[name] = {"params": model.n_params, "after": loss}
        rows.append([name, f"{model.n_params:,}", "-", loss])

    sections = [
        f"Base: {S} steps, {base.n_params:,} parameters, validation loss "
        f"{base_loss:.4f} ({args.steps} steps). Tied to K={K} blocks (cycle: step i runs "
        f"block i mod {K}). Relax at full rank: {full_rank_loss:.4f} (must equal the base). "
        f"Uptraining: {args.uptrain_steps} steps at lr {args.uptrain_lr} on the same corpus "
        "(another data order).",
        "## Validation loss\n\n"
        + common.md_table(
            ["model", "parameters", "after conversion", "after uptraining / training"], rows
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 3: recursive conversion",
        sections,
        {"base": base_loss, "full_rank_relax": full_rank_loss, "unique": K, "results": result},
    )


if __name__ == "__main__":
    main()
