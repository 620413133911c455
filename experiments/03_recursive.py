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

Every figure is over --seeds base models (mean ± std [95% interval]); each seed's variants
are uptrained from that seed's base, and the from-scratch references train one model per
seed. Comparisons are paired by seed.
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
    seeds = list(range(args.seed, args.seed + args.seeds))
    bases = common.base_models(args)
    S = bases[0].depth
    K = args.unique or S // 2
    ranks = [int(r) for r in args.ranks.split(",") if r]

    base_loss, full_rank_loss, params = [], [], {}
    before, after = {}, {}  # variant -> [seeds]
    for seed, base in zip(seeds, bases):
        variants = {
            f"tie {init}": depth.tie(base, K, strategy="cycle", init=init)
            for init in ("stepwise", "average", "lower")
        }
        for r in ranks:
            variants[f"relax r={r}"] = depth.relax(variants["tie stepwise"], base, rank=r)
        full_rank = depth.relax(variants["tie stepwise"], base, rank="full")
        base_loss.append(common.loss(base, data))
        full_rank_loss.append(common.loss(full_rank, data))
        common.log(
            f"seed {seed}: base loss {base_loss[-1]:.4f}; relax at full rank "
            f"{full_rank_loss[-1]:.4f} (reproduces the base)"
        )
        base_dir = common.cached_run_dir(args, "base", common.train_config(args, seed=seed))
        variant_root = Path(args.cache) / "variants" / base_dir.name
        for name, model in variants.items():
            params[name] = model.n_params
            before.setdefault(name, []).append(common.loss(model, data))
            init_dir = variant_root / name.replace(" ", "-").replace("=", "")
            if not (init_dir / "config.json").exists():
                dj.save(model, init_dir)
            tc = common.train_config(
                args,
                model_overrides={},
                init_from=str(init_dir),
                steps=args.uptrain_steps,
                lr=args.uptrain_lr,
                seed=seed + 1,  # another data order than the base's
            )
            tuned = common.trained(args, "uptrain-" + init_dir.name, tc)
            after.setdefault(name, []).append(common.loss(tuned, data))
            common.log(
                f"seed {seed} {name}: loss {before[name][-1]:.4f} -> {after[name][-1]:.4f} "
                f"after {args.uptrain_steps} steps"
            )

    small = lambda steps: common.train_config(
        args, model_overrides=common.model_overrides(args, n_layers=K), steps=steps
    )
    scratch = {}
    for label, steps in (
        ("uptraining budget", args.uptrain_steps),
        ("base + uptraining budget", args.steps + args.uptrain_steps),
    ):
        models = common.trained_seeds(args, f"scratch{K}", small(steps), seeds)
        name = f"{K}-layer from scratch, {steps} steps ({label})"
        params[name] = models[0].n_params
        scratch[name] = [common.loss(m, data) for m in models]

    rows = [[f"base, {S} unique blocks", f"{bases[0].n_params:,}", common.fmt(base_loss), "-"]]
    rows += [[n, f"{params[n]:,}", common.fmt(before[n]), common.fmt(after[n])] for n in before]
    rows += [[n, f"{params[n]:,}", "-", common.fmt(v)] for n, v in scratch.items()]
    best_scratch = list(scratch)[-1]
    verdicts = [
        common.compared(f"{a} - {b}, after uptraining", after[a], after[b])
        for a, b in (
            ("tie stepwise", "tie average"),
            ("tie stepwise", "tie lower"),
            *((f"relax r={r}", "tie stepwise") for r in ranks),
        )
    ]
    verdicts += [
        common.compared(f"{n} after uptraining - base", after[n], base_loss) for n in after
    ]
    verdicts += [
        common.compared(f"{n} after uptraining - {best_scratch}", after[n], scratch[best_scratch])
        for n in after
    ]
    verdicts.append(common.compared(f"base - {best_scratch}", base_loss, scratch[best_scratch]))
    sections = [
        f"Base: {S} steps, {bases[0].n_params:,} parameters, {args.steps} training steps, "
        f"{len(seeds)} seeds ({seeds}). Tied to K={K} blocks (cycle: step i runs block i mod "
        f"{K}). Relax at full rank: {common.fmt(full_rank_loss)} (must equal the base). "
        f"Uptraining: {args.uptrain_steps} steps at lr {args.uptrain_lr} on the same corpus "
        "(another data order). Figures are mean ± std [95% t-interval] over seeds.",
        "## Validation loss\n\n"
        + common.md_table(
            ["model", "parameters", "after conversion", "after uptraining / training"], rows
        ),
        "## Comparisons (paired by seed, 95%)\n\n" + "\n".join(verdicts),
    ]
    common.write_results(
        args,
        out,
        "Experiment 3: recursive conversion",
        sections,
        {
            "seeds": seeds,
            "base": base_loss,
            "full_rank_relax": full_rank_loss,
            "unique": K,
            "params": params,
            "before": before,
            "after": after,
            "scratch": scratch,
        },
    )


if __name__ == "__main__":
    main()
