"""Experiment 10: recurrent depth - loops drawn in training, loops chosen per token at test.

Huginn (Geiping et al. 2025, "Scaling up test-time compute with latent reasoning") trains
a prelude / recurrent core / coda model whose core is looped a number of times drawn per
step from a log-normal Poisson, with truncated backprop through the last loops and the
prelude's output injected into every loop. They report that such a model keeps improving
when given more loops at test time than it was trained with on average, and that a
per-token exit rule (a convergence criterion) saves loops at little cost. Mixture-of-
Recursions (Bae et al. 2025) adds depth-wise batching: tokens at different recursion
depths share one batch of the shared block.

Here: a 4-block llama table (d_model 64): prelude = step 0, core = steps 1-2, coda = step 3.
The recurrent model draws n ~ sample_loops(mean) per step (clipped at --max-loops) with
truncated backprop through the last --backprop loops and input injection; the static
baseline is the same table looped exactly `mean` times (the equal-compute static program,
full backprop). Both are evaluated at test loop counts beyond the training mean, the
recurrent one also with per-token convergence exits, and both schedules of generation
are compared (core ticks and wall time).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import common
import depthjax as dj
from depthjax.adaptive import fit, recurrent as R, recurrent_decode as RD
from depthjax.core.loss import nll_sums


def nll(logits, tokens):
    s, n = nll_sums(logits, tokens, np.ones(tokens.shape, np.float32))
    return float(s), float(n)


def loss_at(model, rec, data, n: int) -> float:
    """Validation loss with the core looped n times (one compile for every n)."""
    total = count = 0.0
    for b in data:
        s, c = nll(R.apply(model, rec, b, jnp.int32(n), backprop=1), b)
        total, count = total + s, count + c
    return total / count


def main(argv=None):
    p = common.parser("10_recurrent_depth", __doc__, layers=4, steps=300, batch_size=8)
    p.add_argument("--mean-loops", type=float, default=4.0, help="mean training loop count")
    p.add_argument("--max-loops", type=int, default=12, help="clip of the training draw")
    p.add_argument("--backprop", type=int, default=2, help="loops differentiated (truncated)")
    p.add_argument("--test-loops", default="1,2,3,4,5,6,8,10,12,16")
    p.add_argument("--tols", default="0.3,0.2,0.1,0.05,0.02", help="exit tolerances")
    p.add_argument("--adaptive-max", type=int, default=16, help="max loops of adaptive exits")
    p.add_argument("--prompts", type=int, default=8, help="rows of the generation batch")
    p.add_argument("--new-tokens", type=int, default=32)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)
    cfg = dj.configs.get(args.model, **common.model_overrides(args))
    base = dj.init(cfg, jax.random.key(args.seed))
    span = (1, cfg.n_layers - 1)
    mean = args.mean_loops
    batches = common.train_batches(args, args.seed)
    settings = lambda tag: {
        "tag": tag,
        "config": cfg.to_dict(),
        "span": span,
        "steps": args.steps,
        "batch": args.batch_size,
        "seq": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "mean": mean,
        "max": args.max_loops,
        "backprop": args.backprop,
    }

    fresh, rec = R.attach(base, *span, inject=True)
    rng = np.random.default_rng(args.seed)
    draws = [R.sample_loops(rng, mean, max_loops=args.max_loops) for _ in range(args.steps)]

    def train_recurrent():
        loss = lambda p, t, n: R.loss(fresh.replace(params=p), rec, t, n, backprop=args.backprop)
        params, hist = fit(
            loss,
            fresh.params,
            lambda i: (*batches(i), jnp.int32(draws[i])),
            steps=args.steps,
            lr=args.lr,
            description="recurrent",
            log_every=max(args.steps // 4, 1),
            log=common.log,
        )
        return fresh.replace(params=params), hist

    recurrent = common.fitted(args, "recurrent", settings("recurrent"), train_recurrent)

    static_rec = R.Recurrence(*span)
    n_static = int(round(mean))

    def train_static():
        loss = lambda p, t: R.loss(base.replace(params=p), static_rec, t, n_static)
        params, hist = fit(
            loss,
            base.params,
            batches,
            steps=args.steps,
            lr=args.lr,
            description="static",
            log_every=max(args.steps // 4, 1),
            log=common.log,
        )
        return base.replace(params=params), hist

    static = common.fitted(args, "static", settings("static"), train_static)

    test_loops = [int(n) for n in args.test_loops.split(",")]
    curve = {
        "recurrent": [loss_at(recurrent, rec, data, n) for n in test_loops],
        "static": [loss_at(static, static_rec, data, n) for n in test_loops],
    }
    for n, a, b in zip(test_loops, curve["recurrent"], curve["static"]):
        common.log(f"loops {n}: recurrent {a:.4f}, static {b:.4f}")

    adaptive = []
    for tol in (float(t) for t in args.tols.split(",")):
        total = count = loops = 0.0
        for b in data:
            logits, n = R.apply_adaptive(recurrent, rec, b, tol=tol, max_loops=args.adaptive_max)
            s, c = nll(logits, b)
            total, count, loops = total + s, count + c, loops + float(np.mean(n)) / len(data)
        adaptive.append({"tol": tol, "mean_loops": loops, "loss": total / count})
        common.log(f"adaptive tol {tol}: {loops:.2f} loops/token, loss {total / count:.4f}")

    # generation: depth-wise batching against lockstep, same tokens
    prompts = data[0][: args.prompts, :32]
    gen = {}
    tol_gen = adaptive[len(adaptive) // 2]["tol"]
    for schedule in RD.SCHEDULES:
        policy = RD.Looped(rec, tol=tol_gen, max_loops=args.adaptive_max, schedule=schedule)
        run = lambda policy=policy: dj.generate(
            recurrent, prompts, args.new_tokens, temperature=0.0, policy=policy
        )
        jax.block_until_ready(run())
        t0 = time.perf_counter()
        res = jax.block_until_ready(run())
        gen[schedule] = {
            "ticks": int(res.ticks),
            "seconds": time.perf_counter() - t0,
            "tokens": np.asarray(res.tokens),
            "loops": np.asarray(res.loops),
        }
    same = bool((gen["depthwise"]["tokens"] == gen["lockstep"]["tokens"]).all())
    loops_fed = gen["depthwise"]["loops"][:, prompts.shape[1] :]

    plt = common.report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        test_loops,
        curve["recurrent"],
        "o-",
        label=f"recurrent (n ~ log-normal Poisson, mean {mean:g})",
    )
    ax.plot(test_loops, curve["static"], "s-", label=f"static (trained at n = {n_static})")
    ax.plot(
        [a["mean_loops"] for a in adaptive],
        [a["loss"] for a in adaptive],
        "^--",
        label="recurrent, per-token exits (mean loops)",
    )
    ax.axvline(mean, color="gray", ls=":", lw=1)
    ax.set_xlabel("core loops at test time")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(top=min(max(curve["static"] + curve["recurrent"]), 2 * min(curve["recurrent"]) + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_loops.png", dpi=120)

    rows = [[n, a, b] for n, a, b in zip(test_loops, curve["recurrent"], curve["static"])]
    arows = [[a["tol"], f"{a['mean_loops']:.2f}", a["loss"]] for a in adaptive]
    d, lock = gen["depthwise"], gen["lockstep"]
    sections = [
        f"Table: {cfg.n_layers} blocks, d_model {cfg.d_model}; prelude steps [0, {span[0]}), "
        f"core [{span[0]}, {span[1]}), coda [{span[1]}, {cfg.n_layers}). {args.steps} training "
        f"steps of {args.batch_size}x{args.seq_len} bytes (lr {args.lr}). Recurrent: n drawn "
        f"per step with mean {mean:g} (clipped at {args.max_loops}; drawn mean "
        f"{np.mean(draws):.2f}), backprop through the last {args.backprop} loops, input "
        f"injection. Static: the same table looped {n_static} times, full backprop.",
        "![loss vs loops](loss_vs_loops.png)",
        "## Validation loss vs core loops at test time\n\n"
        + common.md_table(["loops", "recurrent", "static"], rows),
        f"## Per-token exits (recurrent model, max {args.adaptive_max} loops)\n\n"
        + common.md_table(["tol", "mean loops / token", "loss"], arows),
        f"## Generation: depth-wise batching vs lockstep\n\n{args.prompts} prompts of "
        f"{prompts.shape[1]} bytes, {args.new_tokens} new tokens each, tol {tol_gen}: loops "
        f"per generated token {loops_fed.min()}..{loops_fed.max()} (mean "
        f"{loops_fed.mean():.2f}). Depth-wise batching: {d['ticks']} core ticks, "
        f"{d['seconds']:.2f} s; lockstep: {lock['ticks']} ticks, {lock['seconds']:.2f} s "
        f"({lock['ticks'] / d['ticks']:.2f}x the ticks). Same tokens: {same}.",
    ]
    common.write_results(
        args,
        out,
        "Experiment 10: recurrent depth",
        sections,
        {
            "test_loops": test_loops,
            "curve": curve,
            "adaptive": adaptive,
            "draws_mean": float(np.mean(draws)),
            "generation": {
                k: {"ticks": v["ticks"], "seconds": v["seconds"]} for k, v in gen.items()
            },
            "same_tokens": same,
        },
    )


if __name__ == "__main__":
    main()
