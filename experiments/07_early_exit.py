"""Experiment 7: early exit that pays (LayerSkip training, self-speculative decoding).

LayerSkip (Elhoushi et al. 2024) trains with layer dropout (rates growing with depth) and
an early-exit loss (intermediate residuals decoded by the shared head), so that the first
k layers become a usable draft model, then decodes self-speculatively: the first k layers
draft tokens, the full model verifies them in one pass, the longest agreeing prefix is
kept. The paper reports speed-ups of about 1.3x to 2.2x on its tasks with the full model's
greedy output, and that the recipe makes early exits far more accurate at little cost to
the last layer.

Here two models see the same data, steps and seed: the plain recipe and the early-exit
recipe (`layer_dropout`, `exit_steps=all`, `exit_weights`). Both log the cross-entropy of
every exit while training (the plain run with exit weight 0: measured, not trained). Then:
the exit-loss curves, the validation loss at every exit (logit lens), and the speed and
quality of full decoding, exit-at-k and self-speculative decoding for k = depth/4 and
depth/2, timed in one run by benchmarks/speculative.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import common
from depthjax import metrics as M
from depthjax.pruning.report import pyplot

RECIPES = ("plain", "layerskip")


def main(argv=None):
    # The demo's llama-small (8 blocks, d_model 128), on shorter sequences: CPU scale.
    p = common.parser(
        "07_early_exit", __doc__, model="llama-small", layers=8, steps=200, seq_len=128
    )
    g = p.add_argument_group("early-exit recipe")
    g.add_argument("--layer-dropout", type=float, default=0.2, help="p_max (last step)")
    g.add_argument("--exit-weight", type=float, default=0.3, help="weight of every exit's loss")
    g = p.add_argument_group("decoding benchmark")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--draft-tokens", type=int, default=4)
    g.add_argument("--repeat", type=int, default=5)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)

    every = dict(exit_steps=["all"], log_every=max(1, args.steps // 50))
    configs = {
        "plain": common.train_config(args, exit_weights=[0.0], **every),
        "layerskip": common.train_config(
            args, exit_weights=[args.exit_weight], layer_dropout=args.layer_dropout, **every
        ),
    }
    runs, models = {}, {}
    for name, tc in configs.items():
        models[name] = common.trained(args, f"early-exit-{name}", tc)
        runs[name] = common.cached_run_dir(args, f"early-exit-{name}", tc)
    depth = models["plain"].depth
    exit_loss = {n: M.logit_lens(m, data).values[1:] for n, m in models.items()}  # exits 1..L
    for n in RECIPES:
        common.log(f"{n}: validation loss per exit " + " ".join(f"{x:.3f}" for x in exit_loss[n]))

    # Speed: one benchmark run over both models (ratios comparable within it).
    bench_json = out / "benchmark.json"
    cmd = [
        sys.executable,
        str(common.HERE.parent / "benchmarks" / "speculative.py"),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--draft-tokens",
        str(args.draft_tokens),
        "--repeat",
        str(args.repeat),
        "--json",
        str(bench_json),
    ]
    for name in RECIPES:
        cmd += ["--model", str(runs[name] / "model")]
    common.log("benchmark: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)
    bench = json.loads(bench_json.read_text())["results"]

    curves = {
        n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()]
        for n in RECIPES
    }
    _plot(out, curves, exit_loss, depth)
    tradeoff = []
    for name in RECIPES:
        for r in bench[runs[name].name]:
            at = r["k"] if r["method"] == "exit-at-k" else depth
            quality = exit_loss[name][at - 1]
            tradeoff.append(
                [
                    name,
                    r["method"],
                    r["k"],
                    float(quality),
                    r.get("agreement", 1.0),
                    r["tokens_per_s"],
                    r["ratio"],
                    f"{r['acceptance']:.1%}" if "acceptance" in r else "-",
                    f"{r['tokens_per_pass']:.2f}" if "tokens_per_pass" in r else "-",
                ]
            )
    per_exit = [[k] + [float(exit_loss[n][k - 1]) for n in RECIPES] for k in range(1, depth + 1)]
    sections = [
        f"{depth}-step `{args.model}` models, {args.steps} training steps of {args.batch_size}x"
        f"{args.seq_len} bytes, same data and seed. Early-exit recipe: layer_dropout="
        f"{args.layer_dropout} (exp over depth), every exit weighted {args.exit_weight}.",
        "## Validation loss at every exit (nats/byte; exit k = residual after k steps)\n\n"
        + common.md_table(["exit k", *RECIPES], per_exit),
        "![exit losses](exit_losses.png)",
        f"## Speed and quality (greedy, batch 1, prompt {args.prompt_len}, {args.new_tokens} "
        f"new tokens, {args.draft_tokens} draft tokens per round)\n\n"
        "Quality: the validation loss of what is decoded (exit-at-k: the first k steps; the "
        "full model and self-speculation: the full model) and the share of greedy tokens equal "
        "to the full model's.\n\n"
        + common.md_table(
            [
                "model",
                "method",
                "k",
                "val. loss",
                "agreement",
                "tokens/s",
                "speed ratio",
                "acceptance",
                "tokens / pass",
            ],
            tradeoff,
            floatfmt=".3f",
        ),
    ]
    common.write_results(
        args,
        out,
        "Experiment 7: early exit that pays",
        sections,
        {"exit_loss": exit_loss, "benchmark": bench, "curves": {n: c for n, c in curves.items()}},
    )


def _plot(out, curves, exit_loss, depth: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, depth))
    for ax, name in zip(axes, RECIPES):
        rows = curves[name]
        steps = [r["step"] for r in rows]
        for k in range(1, depth):
            ax.plot(
                steps,
                [r[f"exit_loss_{k}"] for r in rows],
                color=colors[k - 1],
                lw=1,
                label=f"exit {k}",
            )
        ax.plot(steps, [r["loss"] for r in rows], color="k", lw=1.5, label=f"final ({depth})")
        ax.set_title(f"{name}: training loss per exit", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    axes[0].legend(fontsize=7, ncol=2)
    for name in RECIPES:
        axes[2].plot(np.arange(1, depth + 1), exit_loss[name], "o-", ms=3, label=name)
    axes[2].set_title("validation loss at exit k", fontsize=9)
    axes[2].set_xlabel("exit k (steps run)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exit_losses.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
