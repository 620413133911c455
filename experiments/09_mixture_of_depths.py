"""Experiment 9: Mixture-of-Depths against dense models of equal compute.

"Mixture-of-Depths" (Raposo et al. 2024) routes only the top-k tokens of a sequence
through a block (every other block, capacity 12.5% in their best setting), the rest skip
it on the residual; the block output is multiplied by the router weight so the router
trains end to end. They report that MoD models match or beat isoFLOP dense baselines
while taking fewer FLOPs per forward pass, and that sampling works with a causal
predictor of the top-k decision at little cost.

Here: byte-level llama models (d_model 64) trained from scratch with depthjax.adaptive.fit
on the embedded corpus: a dense model of --layers steps; MoD models of the same depth with
every other step routed at each --capacities value (router + predictor, mod.loss); dense
models with fewer steps whose block compute matches the MoD models'. Each is evaluated on
the same validation batches, MoD models both with top-k routing (as trained) and with
causal routing (the predictor, as when sampling). Then a MoD model generates with the
routed KV cache and we count its entries. Every model is trained for each of --seeds
seeds; figures are mean ± std [95% t-interval] over the seeds, comparisons paired by seed.
The predictor is judged against the majority class of the top-k decisions it predicts
(at capacity c, always answering "skip" is right for a fraction 1 - c of the tokens).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import common
import depthjax as dj
from depthjax.adaptive import fit, mod, routed_decode
from depthjax.core.loss import nll_sums


def dense_loss(model):
    def loss(params, tokens):
        logits = dj.apply(model.replace(params=params), tokens)
        value = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], tokens[:, 1:]
        ).mean()
        return value, {}

    return loss


def train(args, tag, model, loss_fn, seed: int):
    settings = {
        "tag": tag,
        "config": model.config.to_dict(),
        "depth": model.depth,
        "steps": args.steps,
        "batch": args.batch_size,
        "seq": args.seq_len,
        "lr": args.lr,
        "seed": seed,
    }

    def run():
        params, history = fit(
            loss_fn,
            model.params,
            common.train_batches(args, seed),
            steps=args.steps,
            lr=args.lr,
            description=tag,
            log_every=max(args.steps // 4, 1),
            log=common.log,
        )
        return model.replace(params=params), history

    return common.fitted(args, tag, settings, run)


def step_time(fn, params, tokens) -> float:
    """Median seconds of a jitted gradient of `fn` (one training step's compute): CPU time
    of this process on a CPU backend (robust to other jobs sharing the cores), else wall."""
    clock = time.process_time if jax.default_backend() == "cpu" else time.perf_counter
    g = jax.jit(jax.grad(lambda p, t: fn(p, t)[0]))
    jax.block_until_ready(g(params, tokens))
    times = []
    for _ in range(7):
        t0 = clock()
        jax.block_until_ready(g(params, tokens))
        times.append(clock() - t0)
    return sorted(times)[3]


def evaluate(model, spec, data, routed) -> dict:
    """Per routing: validation loss, the fraction of (routed step, token) pairs that ran the
    block; for top-k routing also the predictor's accuracy against the top-k decisions and
    the accuracy of always answering the majority class of those decisions (the baseline a
    predictor has to beat)."""
    ev = {}
    for routing in mod.ROUTINGS:
        total = count = frac = acc = 0.0
        for b in data:
            logits, routes = mod.apply(model, spec, b, routing=routing)
            s, n = nll_sums(logits, b, np.ones(b.shape, np.float32))
            total, count = total + float(s), count + float(n)
            frac += float(np.asarray(routes.select)[routed].mean()) / len(data)
            acc += float(routes.predictor_accuracy) / len(data)
        ev[routing] = {"loss": total / count, "routed_fraction": frac}
        if routing == "topk":
            ev[routing]["predictor_accuracy"] = acc
            ev[routing]["majority_accuracy"] = max(frac, 1.0 - frac)
    return ev


def decode(args, model, spec, prompts, S: int) -> dict:
    """Greedy sampling with the routed KV cache (causal predictor): its entries per step
    and its allocated bytes against a dense cache's."""
    max_len = prompts.shape[1] + args.new_tokens - 1
    routed_len = max(1, int(np.ceil(2 * spec.capacity * max_len)))
    policy = routed_decode.Routed(mod=spec, routed_len=routed_len)
    generation = dj.generate(model, prompts, args.new_tokens, temperature=0.0, policy=policy)
    cache = generation.cache
    full = routed_decode.RoutedCache.empty(
        model.config, routed_decode.Layout((False,) * S, max_len, max_len, 0.0), prompts.shape[0]
    )
    return {
        "entries_per_step": cache.entries().mean(1).tolist(),
        "max_len": max_len,
        "routed_len": routed_len,
        "cache_bytes": cache.nbytes,
        "dense_cache_bytes": full.nbytes,
        "sample": bytes(np.asarray(generation.tokens[0], np.uint8)).decode("utf-8", "replace"),
    }


def run_seed(args, seed: int, data, tokens, capacities) -> dict:
    """Every model of one seed: losses, relative step times, routing and decoding."""
    S = args.layers
    routed = list(range(1, S, 2))
    cfg = dj.configs.get(args.model, **common.model_overrides(args))
    init = lambda n: dj.init(cfg.replace(n_layers=n), jax.random.key(seed))
    res = {}
    dense = train(args, f"dense{S}", init(S), dense_loss(init(S)), seed)
    t_dense = step_time(dense_loss(dense), dense.params, tokens)
    res[f"dense{S}"] = {"compute": 1.0, "loss": common.loss(dense, data), "step_time": 1.0}
    common.log(f"seed {seed}: dense {S}: loss {res[f'dense{S}']['loss']:.4f}")
    for c in capacities:
        fresh, spec = mod.attach(init(S), routed, c, jax.random.key(seed + 1))
        loss_fn = lambda p, t, spec=spec, m=fresh: mod.loss(m.replace(params=p), spec, t)
        model = train(args, f"mod{S}-c{c:g}", fresh, loss_fn, seed)
        k = spec.tokens_routed(args.seq_len)
        t = step_time(
            lambda p, x, model=model, spec=spec: mod.loss(model.replace(params=p), spec, x),
            model.params,
            tokens,
        )
        res[f"mod c={c:g}"] = {
            "compute": (S - len(routed) + len(routed) * k / args.seq_len) / S,
            "step_time": t / t_dense,
            **evaluate(model, spec, data, routed),
        }
        if c == min(capacities):
            res["decode"] = decode(args, model, spec, data[0][:4, :64], S)
        ev = res[f"mod c={c:g}"]
        common.log(
            f"seed {seed}: MoD c={c:g}: top-k {ev['topk']['loss']:.4f}, causal "
            f"{ev['causal']['loss']:.4f} (routes {ev['causal']['routed_fraction']:.3f})"
        )
    for n in small_depths(S, routed, capacities, args.seq_len):
        model = train(args, f"dense{n}", init(n), dense_loss(init(n)), seed)
        t = step_time(dense_loss(model), model.params, tokens)
        res[f"dense{n}"] = {
            "compute": n / S,
            "loss": common.loss(model, data),
            "step_time": t / t_dense,
        }
    return res


def small_depths(S: int, routed, capacities, seq_len: int) -> list[int]:
    """Dense depths whose block compute matches each MoD model's (rounded)."""
    depths = set()
    for c in capacities:
        k = mod.MoD.create(S, routed, c).tokens_routed(seq_len)
        depths.add(max(1, round(S - len(routed) + len(routed) * k / seq_len)))
    return sorted(depths)


def main(argv=None):
    p = common.parser("09_mixture_of_depths", __doc__, steps=300, batch_size=8)
    p.add_argument("--capacities", default="0.125,0.5", help="capacities of the MoD models")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    args = common.parse(p, argv, __file__)
    out, data, seeds = common.out_dir(args), common.eval_batches(args), common.seed_list(args)
    S = args.layers
    routed = list(range(1, S, 2))
    capacities = [float(x) for x in args.capacities.split(",")]
    tokens = common.train_batches(args, 99)(0)[0]
    per_seed = [run_seed(args, seed, data, tokens, capacities) for seed in seeds]
    get = lambda *path: np.array([_dig(r, path) for r in per_seed])

    dense_names = [f"dense{S}"] + [
        f"dense{n}" for n in small_depths(S, routed, capacities, args.seq_len)
    ]
    rows = []
    for name in dense_names:
        n = int(name[5:])
        rows.append(
            [
                f"dense, {n} steps",
                f"{n / S:.2f}",
                common.fmt(get(name, "step_time"), 2),
                common.fmt(get(name, "loss"), 3),
                "-",
            ]
        )
    for c in capacities:
        m = f"mod c={c:g}"
        rows.append(
            [
                f"MoD, {S} steps, capacity {c:g}",
                f"{per_seed[0][m]['compute']:.2f}",
                common.fmt(get(m, "step_time"), 2),
                common.fmt(get(m, "topk", "loss"), 3),
                common.fmt(get(m, "causal", "loss"), 3),
            ]
        )
    pred_rows = [
        [
            f"{c:g}",
            common.fmt(get(f"mod c={c:g}", "topk", "routed_fraction"), 3),
            common.fmt(get(f"mod c={c:g}", "causal", "routed_fraction"), 3),
            common.fmt(get(f"mod c={c:g}", "topk", "predictor_accuracy"), 3),
            common.fmt(get(f"mod c={c:g}", "topk", "majority_accuracy"), 3),
        ]
        for c in capacities
    ]
    verdicts = []
    for c in capacities:
        m = f"mod c={c:g}"
        same = f"dense{small_depths(S, routed, [c], args.seq_len)[0]}"
        verdicts += [
            common.compare(
                get(m, "topk", "loss"),
                get(f"dense{S}", "loss"),
                f"MoD c={c:g} (top-k)",
                f"dense {S}",
                3,
            ),
            common.compare(
                get(m, "topk", "loss"),
                get(same, "loss"),
                f"MoD c={c:g} (top-k)",
                f"dense {same[5:]} (same compute)",
                3,
            ),
            common.compare(
                get(m, "causal", "loss"), get(m, "topk", "loss"), f"MoD c={c:g} causal", "top-k", 3
            ),
            common.compare(
                get(m, "topk", "predictor_accuracy"),
                get(m, "topk", "majority_accuracy"),
                f"predictor (c={c:g})",
                "majority class",
                3,
                "accuracy",
            ),
        ]
    c0 = min(capacities)
    dec = [r["decode"] for r in per_seed]
    entries = np.array([d["entries_per_step"] for d in dec])  # [seed, step]
    d_model = dj.configs.get(args.model, **common.model_overrides(args)).d_model
    sections = [
        f"Models: llama-style, d_model {d_model}, "
        f"trained {args.steps} steps of {args.batch_size}x{args.seq_len} bytes with "
        f"depthjax.adaptive.fit (lr {args.lr}), seeds {seeds}; MoD routes steps {routed}. "
        "'compute' is the fraction of the dense model's block work (tokens x steps); 'step "
        "time' is a measured training step (forward + backward) relative to the dense "
        "model of the same seed. Cells: mean ± std [95% t-interval] over the seeds.",
        "## Validation loss (nats/byte)\n\n"
        + common.md_table(
            ["model", "compute", "step time", "loss (top-k)", "loss (causal predictor)"], rows
        ),
        "## The causal predictor against the top-k decisions\n\n"
        "Fractions of (routed step, token) pairs that ran the block; accuracy of the "
        "predictor against the top-k decisions, and of always answering the more common "
        "decision (the majority class: a predictor must beat it to be useful).\n\n"
        + common.md_table(
            [
                "capacity",
                "top-k routed fraction",
                "causal routed fraction",
                "predictor accuracy",
                "majority-class accuracy",
            ],
            pred_rows,
        ),
        "## What the intervals support (paired by seed, 95%)\n\n"
        + "\n".join(f"- {v}" for v in verdicts),
        f"## Sampling with the routed KV cache (capacity {c0:g})\n\n"
        f"4 prompts of 64 bytes + {args.new_tokens} new, causal predictor; routed steps "
        f"capped at {dec[0]['routed_len']} entries per row. Mean cache entries per step: "
        + ", ".join(common.fmt(entries[:, i], 1) for i in range(S))
        + f" (of {dec[0]['max_len']} tokens). Allocated KV bytes {dec[0]['cache_bytes']:,} vs "
        f"{dec[0]['dense_cache_bytes']:,} for a dense cache: set by the cap (2 x capacity of "
        "the tokens), not by what the predictor routed.",
    ]
    common.write_results(
        args,
        out,
        "Experiment 9: Mixture-of-Depths",
        sections,
        {"seeds": seeds, "capacities": capacities, "per_seed": per_seed},
    )


def _dig(d: dict, path):
    for k in path:
        d = d[k]
    return d


if __name__ == "__main__":
    main()
