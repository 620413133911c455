"""`depthjax prune`: remove the n least important units of a model, optionally recover.

    depthjax prune --model DIR --metric block_influence --n 2 [--unit block]
                   [--data FILES] [--task TASK.jsonl]
                   [--recover bias|linear|lora|distill] [--rank 8] [--lora-steps 100]
                   [--temperature 1.0] [--hidden 0.0]
                   [--random-subsets 16] --out CKPT

Scores and recovery are calibrated on --data (its first 80%) or the embedded corpus's train
split; the measure before and after (the --task, else the validation loss, or the
representation cosine for encoders) on the rest, beside the random control: its mean and
spread over --random-subsets random subsets of the same size. ablation and shapley rank
by that measure; module_similarity ("What Matters in Transformers?") ranks sublayers.
--recover distill trains the pruned program's LoRA to match the full model's next-token
distribution (KL at --temperature, plus --hidden times the MSE of the residual stream after
each kept step); the full model is the same table walked by its own program.
"""

from __future__ import annotations

import argparse
import os

from .common import (
    UsageError,
    add_data_args,
    add_quiet_arg,
    check_out_dir,
    count,
    load_with_data,
    natural,
)

METRICS = (
    "block_influence",
    "angular_distance",
    "relative_contribution",
    "module_similarity",
    "ablation",
    "shapley",
    "gate_gradient",
)


def _metric(name: str, unit: str, calib, measure, args):
    """model -> Scores ranking `unit` by metric `name`."""
    import jax
    import numpy as np

    from .. import metrics as M
    from ..pruning import report

    if name in ("block_influence", "angular_distance") and unit != "block":
        raise UsageError(
            f"--metric {name} scores whole blocks; use --unit block, or ablation, "
            "shapley, relative_contribution or module_similarity for sublayers"
        )
    if name == "module_similarity" and unit != "sublayer":
        raise UsageError("--metric module_similarity ranks sublayers: use --unit sublayer")
    if name == "relative_contribution":

        def contribution(m):
            rc = M.relative_contribution(m, calib)
            if unit != "sublayer":
                return rc[unit]
            return M.Scores(
                "relative_contribution",
                "sublayer",
                np.concatenate([rc["attn"].values, rc["mlp"].values]),
            )

        return contribution
    if name == "gate_gradient":  # first-order estimate of each unit's ablation, one backward

        def taylor(m):
            v = M.gate_gradient(m, calib).values
            S = m.depth
            by_unit = {"block": v[:S] + v[S:], "attn": v[:S], "mlp": v[S:], "sublayer": v}
            return M.Scores("gate_gradient", unit, by_unit[unit])

        return taylor
    return {
        "block_influence": lambda m: M.block_influence(m, calib),
        "angular_distance": lambda m: M.angular_distance(m, calib),
        "module_similarity": lambda m: M.module_similarity(m, calib),
        "ablation": lambda m: M.ablation(m, calib, unit=unit, measure=measure),
        "shapley": lambda m: M.shapley(
            m,
            calib,
            unit=unit,
            key=jax.random.key(args.seed),
            num_permutations=report.shapley_permutations_for(m, unit, args.shapley_permutations),
            measure=measure,
        ),
    }[name]


def _check(args, model) -> None:
    """Flags that cannot fit the model, refused before any scoring."""
    from ..metrics.coalitions import active_units
    from ..pruning.recovery import DEFAULT_RANK

    on = int(active_units(model, args.unit).sum())
    limit = on - 1 if args.unit == "block" else on
    if not 1 <= args.n <= limit:
        raise UsageError(
            f"--n {args.n}: the model has {model.depth} steps ({on} {args.unit} "
            f"units on); choose 1..{limit}"
        )
    if args.random_subsets == 1:
        raise UsageError("--random-subsets 1: a spread needs at least 2 subsets (0 skips it)")
    for flag, value in (("--temperature", args.temperature), ("--hidden", args.hidden)):
        if value is not None and args.recover != "distill":
            raise UsageError(f"{flag} applies to --recover distill only")
    if args.temperature is not None and not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.hidden is not None and not args.hidden >= 0:
        raise UsageError(f"--hidden must be >= 0, got {args.hidden}")
    if args.recover in ("linear", "lora", "distill"):
        if args.rank is None:
            args.rank = min(DEFAULT_RANK[args.recover], model.config.d_model)
        if args.recover == "linear" and args.rank > model.config.d_model:
            raise UsageError(
                f"--rank {args.rank} exceeds the model width d_model={model.config.d_model}"
            )


def _prune(args) -> int:
    import numpy as np

    import depthjax as dj
    from .. import metrics as M
    from ..files import checkpoint
    from ..pruning import report

    check_out_dir(args.out, checkpoint=True)
    data = load_with_data(args)
    model, calib = data.model, data.calib
    _check(args, model)
    metric = _metric(args.metric, args.unit, calib, data.measure(calib), args)
    scores = None if args.iterative else metric(model)
    pruned = dj.prune(
        model, scores, args.n, unit=args.unit, metric=metric, iterative=args.iterative
    )
    measure = data.measure(data.evals)
    # Both models are measured against the full model (a representation measure's reference).
    if hasattr(measure, "reference") and measure.reference is None:
        measure.reference = model
    value = lambda m: float(
        M.coalition_measures(m, data.evals, "block", np.ones((1, m.depth)), measure)[0]
    )
    what = report.measure_label(measure)
    print(f"{what}: full {value(model):.4f}  pruned {value(pruned):.4f}", flush=True)
    if args.random_subsets:  # the control: what removing n units at random gives
        control = M.random_pruning(
            model,
            data.evals,
            args.n,
            args.unit,
            num_subsets=args.random_subsets,
            seed=args.seed,
            measure=measure,
        )
        print(f"{what}: random {args.n} {args.unit} units {control.describe()}", flush=True)
    if args.recover:
        pruned = dj.recover(
            pruned,
            model,
            calib,
            method=args.recover,
            rank=args.rank,
            lora_steps=args.lora_steps,
            **(
                {"temperature": args.temperature, "hidden": args.hidden}
                if args.recover == "distill"
                else {}
            ),
            log_every=max(1, args.lora_steps // 10),
        )
        print(f"{what} after {args.recover} recovery: {value(pruned):.4f}")
    print(pruned.program)
    files = data.model_dir.files
    checkpoint.save(pruned, args.out, files=files)
    print(
        f"wrote {args.out}"
        + (f" (with {', '.join(os.path.basename(f) for f in files)})" if files else "")
    )
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="remove the n least important units, optionally recover",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_args(p)
    p.add_argument("--metric", default="block_influence", choices=METRICS)
    p.add_argument("--n", type=count, required=True, help="units to remove")
    p.add_argument("--unit", default="block", choices=["block", "attn", "mlp", "sublayer"])
    p.add_argument("--iterative", action="store_true", help="re-score after each removal")
    p.add_argument(
        "--recover",
        choices=["bias", "linear", "lora", "distill"],
        help="bias / linear: closed-form adapters; lora: LoRA trained on the LM loss; "
        "distill: LoRA trained on the KL to the full model (same table, no second copy)",
    )
    p.add_argument(
        "--rank",
        type=count,
        default=None,
        help="rank for linear / lora / distill recovery (default: 16 for linear, capped at "
        "d_model; 8 for lora and distill)",
    )
    p.add_argument(
        "--lora-steps", type=count, default=100, help="Adam steps of lora / distill recovery"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="distill: softmax temperature of teacher and student (default 1.0)",
    )
    p.add_argument(
        "--hidden",
        type=float,
        default=None,
        help="distill: weight of the residual-stream MSE after each kept step "
        "(default 0.0: logits only)",
    )
    p.add_argument(
        "--shapley-permutations",
        type=count,
        default=None,
        help="sampled (antithetic) Shapley permutations; default: exact when the "
        "2**n coalitions are at most 4096, else 16",
    )
    p.add_argument(
        "--random-subsets",
        type=natural,
        default=16,
        help="the random control: the measure's mean, std, min and max over this many "
        "distinct random subsets of --n units (all of them when there are fewer), one batch "
        "of programs; 0 skips it (default 16)",
    )
    p.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    add_quiet_arg(p)
    p.set_defaults(func=_prune)
