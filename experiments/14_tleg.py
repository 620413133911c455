"""Experiment 14: TLEG, models of several depths from one learngene.

Xia et al. 2024 ("Transformer as Linear Expansion of Learngene", TLEG) train an auxiliary
transformer whose layer l of L has parameters theta_A + (l / (L - 1)) * theta_B, then
initialize models of any depth from the two learngene tensors and fine-tune them briefly;
they report quality comparable to training each depth from scratch at a fraction of the
total cost (one auxiliary run serves every depth).

Here, for each seed: an auxiliary model of --aux-depth steps is trained for --aux-steps
steps with its table parameterized by the learngene (dj.depth.linear_expand(train=True):
the linear constraint holds exactly at every step); models of --depths are expanded from
its learngene and fine-tuned for --tune-steps steps. The baseline trains each depth from
scratch for --aux-steps + --tune-steps steps (the same number of steps as the expanded
model's whole history; TLEG's cost per depth is lower, since the auxiliary run is shared).
Every number is reported as mean ± standard deviation with its 95% t-interval over the
seeds, and TLEG and scratch are compared paired by seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import common
import depthjax as dj
from depthjax import depth
from depthjax.adaptive.training import fit
from depthjax.core.loss import nll_sums
from depthjax.pruning import report


def nll(model: dj.DepthModel):
    """loss_fn for fit: mean next-token loss of `model` with the given parameters."""

    def loss(params, tokens):
        logits = dj.apply(model.replace(params=params), tokens)
        s, n = nll_sums(logits, tokens, jnp.ones_like(tokens))
        return s / n, {}

    return loss


def trained_fit(args, tag: str, settings: dict, model: dj.DepthModel, steps: int, seed: int):
    """`model` trained with depthjax.adaptive.fit for `steps` steps (cached)."""

    def train():
        params, history = fit(
            nll(model),
            model.params,
            common.train_batches(args, seed),
            steps=steps,
            lr=args.lr,
            log=common.log,
            log_every=max(steps // 5, 1),
            description=tag,
        )
        return model.replace(params=params), history

    return common.fitted(args, tag, settings, train)


def main(argv=None):
    p = common.parser("14_tleg", __doc__)
    p.add_argument("--depths", default="4,6,8", help="depths to expand to, comma-separated")
    p.add_argument("--aux-depth", type=int, default=8, help="steps of the auxiliary model")
    p.add_argument("--aux-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--tune-steps", type=int, default=100)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)
    depths = [int(d) for d in args.depths.split(",") if d]
    aux_steps = args.aux_steps or args.steps
    base = dict(
        model=args.model,
        over=common.model_overrides(args),
        lr=args.lr,
        batch=args.batch_size,
        seq=args.seq_len,
    )

    losses = {f"{kind} depth {d}": [] for d in depths for kind in ("tleg", "scratch")}
    aux_losses = []
    for seed in range(args.seed, args.seed + args.seeds):  # common's --seeds
        cfg = dj.configs.get(args.model, **common.model_overrides(args, n_layers=2))
        # the line through two random layers: theta_A = layer 0, theta_B = layer 1 - layer 0
        # (norm scales: theta_B = 0, so every layer starts at scale 1)
        seed_gene = depth.learngene(dj.init(cfg, jax.random.key(seed)))
        aux = depth.linear_expand(seed_gene, args.aux_depth, train=True)
        aux_settings = dict(
            base, kind="aux", init="line", depth=args.aux_depth, steps=aux_steps, seed=seed
        )
        aux = trained_fit(args, f"tleg-aux-s{seed}", aux_settings, aux, aux_steps, seed)
        aux_losses.append(common.loss(aux, data))
        gene = depth.learngene(aux)
        for d in depths:
            expanded = depth.linear_expand(gene, d)
            settings = dict(
                base,
                kind="tune",
                aux=aux_settings,  # a new auxiliary run is a new tuning
                depth=d,
                steps=args.tune_steps,
                seed=seed,
            )
            tuned = trained_fit(
                args, f"tleg-d{d}-s{seed}", settings, expanded, args.tune_steps, seed + 100
            )
            losses[f"tleg depth {d}"].append(common.loss(tuned, data))
            cfg_d = dj.configs.get(args.model, **common.model_overrides(args, n_layers=d))
            total = aux_steps + args.tune_steps
            settings = dict(base, kind="scratch", depth=d, steps=total, seed=seed)
            scratch = trained_fit(
                args,
                f"scratch-d{d}-s{seed}",
                settings,
                dj.init(cfg_d, jax.random.key(seed)),
                total,
                seed,
            )
            losses[f"scratch depth {d}"].append(common.loss(scratch, data))
            common.log(
                f"seed {seed} depth {d}: tleg {losses[f'tleg depth {d}'][-1]:.4f}, "
                f"scratch {losses[f'scratch depth {d}'][-1]:.4f}"
            )

    rows = [
        [d, common.fmt(losses[f"tleg depth {d}"]), common.fmt(losses[f"scratch depth {d}"])]
        for d in depths
    ]
    means, bands = common.mean_bands(
        {
            name: np.array([losses[f"{k} depth {d}"] for d in depths]).T  # [seeds, depths]
            for name, k in (("TLEG (expanded + tuned)", "tleg"), ("from scratch", "scratch"))
        }
    )
    report.plot_curves(
        means,
        out / "tleg_vs_scratch.png",
        xlabel=f"depth index ({', '.join(map(str, depths))})",
        title=f"TLEG vs scratch, mean ± std over {args.seeds} seeds",
        bands=bands,
    )
    sections = [
        f"Auxiliary: {args.aux_depth} steps parameterized by the learngene, {aux_steps} training "
        f"steps; its validation loss {common.fmt(aux_losses)}. Expanded models are "
        f"fine-tuned for {args.tune_steps} steps; scratch models train for "
        f"{aux_steps + args.tune_steps} steps. Steps of {args.batch_size}x{args.seq_len} tokens.",
        f"## Validation loss (mean ± std [95% interval] over {args.seeds} seeds)\n\n"
        + common.md_table(["depth", "TLEG", "from scratch"], rows),
        "## TLEG minus scratch, paired by seed\n\n"
        + "\n".join(
            common.compared(f"depth {d}", losses[f"tleg depth {d}"], losses[f"scratch depth {d}"])
            for d in depths
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 14: TLEG linear expansion vs training from scratch",
        sections,
        {"aux": aux_losses, "losses": losses, "depths": depths, "seeds": args.seeds},
    )


if __name__ == "__main__":
    main()
