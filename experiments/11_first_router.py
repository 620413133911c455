"""Experiment 11: FiRST - a per-sequence router that picks which later steps run.

"FiRST: Finetuning Router-Selective Transformers for Input-Adaptive Latency Reduction"
(Jain et al. 2024) adds routers to a frozen pretrained model that decide, at prefill and
per sequence, which layers to skip for the whole generation, so the choice costs nothing
while decoding and the KV cache of a skipped layer is never written. They report that
input-adaptive skipping keeps quality better than static layer removal at the same
latency saving.

Here: the base model of experiments 1-6 (frozen) gets a router on the residual after step
--after; it is trained (alone, depthjax.adaptive.fit, trainable="^first/") at each
--costs price per step run, on windows whose first half is the prompt and whose second
half is scored. The static baseline runs the same program for every sequence: the
greedy best program with k later steps removed (chosen on the score batches by the same
continuation loss), for every k. Both are measured on the validation batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import common
import depthjax as dj
from depthjax.adaptive import first, fit, routed_decode
from depthjax.core.loss import nll_sums


@functools.partial(jax.jit, static_argnames=("prompt_len",))
def _cont_sums(model, tokens, *, prompt_len):
    logits = dj.apply(model, tokens)
    w = jnp.broadcast_to(jnp.arange(tokens.shape[1]) >= prompt_len - 1, tokens.shape)
    return nll_sums(logits, tokens, w.astype(jnp.float32))


def continuation_loss(model, data, prompt_len, run=None) -> float:
    """Loss on the tokens after the prompt; run [depth] bool gates steps off (same compile)."""
    if run is not None:
        keep = jnp.asarray(run, jnp.float32)
        prog = model.program
        model = model.with_program(prog.replace(attn=prog.attn * keep, mlp=prog.mlp * keep))
    sums = [_cont_sums(model, b, prompt_len=prompt_len) for b in data]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


def static_curve(model, after, score_data, eval_data, prompt_len):
    """Greedy removal of later steps: for k = 0.. the best program with k steps removed
    (chosen on score_data), evaluated on eval_data. Returns [(steps run, loss, removed)]."""
    run = np.ones(model.depth, bool)
    out = [(int(run.sum()), continuation_loss(model, eval_data, prompt_len, run), [])]
    removed = []
    while run[after:].sum() > 1:
        trials = {}
        for i in np.flatnonzero(run[after:]) + after:
            r = run.copy()
            r[i] = False
            trials[int(i)] = continuation_loss(model, score_data, prompt_len, r)
        best = min(trials, key=trials.get)
        run[best] = False
        removed.append(best)
        out.append(
            (int(run.sum()), continuation_loss(model, eval_data, prompt_len, run), list(removed))
        )
    return out


def main(argv=None):
    p = common.parser("11_first_router", __doc__)
    p.add_argument(
        "--after", type=int, default=2, help="the router reads the residual after this step"
    )
    p.add_argument("--costs", default="0.005,0.02,0.05,0.1", help="prices per step run")
    p.add_argument("--router-steps", type=int, default=150)
    p.add_argument("--router-lr", type=float, default=3e-3)
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data, score = common.eval_batches(args), common.score_batches(args)
    prompt_len = args.seq_len // 2
    base = common.base_model(args)
    S = base.depth
    fresh, spec = first.attach(base, args.after, jax.random.key(args.seed + 7))
    batches = common.train_batches(args, args.seed + 5)

    full_loss = continuation_loss(base, data, prompt_len)
    curve = static_curve(base, args.after, score, data, prompt_len)
    common.log(
        f"full model {full_loss:.4f}; static curve "
        + ", ".join(f"{n}:{loss:.3f}" for n, loss, _ in curve)
    )

    results, models = [], {}
    for cost in (float(c) for c in args.costs.split(",")):
        base_dir = common.cached_run_dir(args, "base", common.train_config(args))
        settings = {
            "tag": "first",
            "base": str(base_dir),
            "after": args.after,
            "cost": cost,
            "steps": args.router_steps,
            "lr": args.router_lr,
            "prompt_len": prompt_len,
            "seed": args.seed,
        }

        def train(cost=cost):
            loss = lambda p, t: first.loss(
                fresh.replace(params=p), spec, t, prompt_len=prompt_len, cost=cost
            )
            params, hist = fit(
                loss,
                fresh.params,
                batches,
                steps=args.router_steps,
                lr=args.router_lr,
                trainable="^first/",
                description=f"cost {cost}",
                log_every=max(args.router_steps // 3, 1),
                log=common.log,
            )
            return fresh.replace(params=params), hist

        routed = models[cost] = common.fitted(args, f"first-c{cost:g}", settings, train)
        total = count = 0.0
        runs = []
        for b in data:
            logits, gates = first.apply(routed, spec, b, prompt_len=prompt_len)
            w = np.broadcast_to(np.arange(b.shape[1]) >= prompt_len - 1, b.shape).astype(np.float32)
            s, n = nll_sums(logits, b, w)
            total, count = total + float(s), count + float(n)
            runs.append(np.asarray(gates) > 0.5)
        runs = np.concatenate(runs)
        programs = {tuple(r.astype(int)) for r in runs}
        row = {
            "cost": cost,
            "steps_run": float(runs.sum(1).mean()),
            "loss": total / count,
            "distinct_programs": len(programs),
            "run_rate": runs[:, args.after :].mean(0).round(3).tolist(),
        }
        results.append(row)
        common.log(
            f"cost {cost}: {row['steps_run']:.2f} steps, loss {row['loss']:.4f}, "
            f"{len(programs)} programs"
        )

    # decoding keeps each row's program: 4 prompts, checked against dj.generate of it
    mid = results[len(results) // 2]
    routed = models[mid["cost"]]
    prompts = data[0][:4, :prompt_len]
    run = first.choose(routed, spec, prompts)
    policy = routed_decode.Routed(row_steps=run)
    toks = dj.generate(routed, prompts, 16, temperature=0.0, policy=policy).tokens
    run = np.asarray(run)
    same = all(
        np.array_equal(
            toks[b],
            dj.generate(
                first.program_for(routed, run[b]), prompts[b : b + 1], 16, temperature=0.0
            ).tokens[0],
        )
        for b in range(len(prompts))
    )
    decode = {
        "cost": mid["cost"],
        "programs": [np.flatnonzero(r).tolist() for r in run],
        "same_as_static_programs": same,
    }

    plt = common.report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [n for n, _, _ in curve],
        [loss for _, loss, _ in curve],
        "s-",
        label="static (greedy best program)",
    )
    ax.plot(
        [r["steps_run"] for r in results],
        [r["loss"] for r in results],
        "o",
        ms=7,
        label="FiRST (mean steps run per sequence)",
    )
    for r in results:
        ax.annotate(
            f"cost {r['cost']:g}",
            (r["steps_run"], r["loss"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel(f"steps run (of {S})")
    ax.set_ylabel("continuation loss (nats/byte)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_steps.png", dpi=120)

    srows = [[n, S - n, loss, " ".join(map(str, rem)) or "-"] for n, loss, rem in curve]
    frows = [
        [
            r["cost"],
            f"{r['steps_run']:.2f}",
            f"{S - r['steps_run']:.2f}",
            r["loss"],
            r["distinct_programs"],
            " ".join(f"{x:.2f}" for x in r["run_rate"]),
        ]
        for r in results
    ]
    sections = [
        f"Base: {S} steps (frozen), full-model continuation loss {full_loss:.4f} (the second "
        f"half of each {args.seq_len}-byte window, prompt = first {prompt_len} bytes). Router "
        f"after step {args.after}, trained {args.router_steps} steps per cost.",
        "![quality vs steps](quality_vs_steps.png)",
        "## FiRST\n\n"
        + common.md_table(
            [
                "cost",
                "steps run",
                "steps saved",
                "loss",
                "distinct programs",
                f"run rate of steps {args.after}..",
            ],
            frows,
        ),
        "## Static baseline (one program for every sequence)\n\n"
        + common.md_table(["steps run", "steps saved", "loss", "removed (greedy order)"], srows),
        f"## Decoding\n\nCost {decode['cost']:g}: the {len(prompts)} prompts run steps "
        + "; ".join(" ".join(map(str, p)) for p in decode["programs"])
        + f". Batched routed decoding equals dj.generate of each row's program: {same}.",
    ]
    common.write_results(
        args,
        out,
        "Experiment 11: FiRST per-sequence routing",
        sections,
        {"full": full_loss, "static": curve, "first": results, "decode": decode},
    )


if __name__ == "__main__":
    main()
