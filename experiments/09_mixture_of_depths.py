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
routed KV cache and we count its entries.
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


def train(args, tag, model, loss_fn):
    settings = {
        "tag": tag,
        "config": model.config.to_dict(),
        "depth": model.depth,
        "steps": args.steps,
        "batch": args.batch_size,
        "seq": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
    }

    def run():
        params, history = fit(
            loss_fn,
            model.params,
            common.train_batches(args, args.seed),
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


def main(argv=None):
    p = common.parser("09_mixture_of_depths", __doc__, steps=300, batch_size=8)
    p.add_argument("--capacities", default="0.125,0.5", help="capacities of the MoD models")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    args = common.parse(p, argv, __file__)
    out = common.out_dir(args)
    data = common.eval_batches(args)
    S = args.layers
    routed = list(range(1, S, 2))
    cfg = dj.configs.get(args.model, **common.model_overrides(args))
    init = lambda n: dj.init(cfg.replace(n_layers=n), jax.random.key(args.seed))
    tokens = common.train_batches(args, 99)(0)[0]

    rows, result = [], {}
    dense = train(args, f"dense{S}", init(S), dense_loss(init(S)))
    t_dense = step_time(dense_loss(dense), dense.params, tokens)
    base_loss = common.loss(dense, data)
    rows.append([f"dense, {S} steps", "1.00", "1.00", base_loss, "-", "-"])
    result[f"dense{S}"] = {"compute": 1.0, "loss": base_loss, "step_time": 1.0}
    common.log(f"dense {S}: loss {base_loss:.4f}")

    small_depths, mod_models = set(), {}
    for c in (float(x) for x in args.capacities.split(",")):
        fresh, spec = mod.attach(init(S), routed, c, jax.random.key(args.seed + 1))
        loss_fn = lambda p, t, spec=spec, m=fresh: mod.loss(m.replace(params=p), spec, t)
        model = train(args, f"mod{S}-c{c:g}", fresh, loss_fn)
        mod_models[c] = model, spec
        k = spec.tokens_routed(args.seq_len)
        compute = (S - len(routed) + len(routed) * k / args.seq_len) / S
        small_depths.add(max(1, round(compute * S)))
        ev = {}
        for routing in mod.ROUTINGS:
            total = count = frac = acc = 0.0
            for b in data:
                logits, routes = mod.apply(model, spec, b, routing=routing)
                s, n = nll_sums(logits, b, np.ones(b.shape, np.float32))
                total, count = total + float(s), count + float(n)
                frac += float(np.asarray(routes.select)[routed].mean()) / len(data)
                acc += float(routes.predictor_accuracy) / len(data)
            ev[routing] = {
                "loss": total / count,
                "routed_fraction": frac,
                "predictor_accuracy": acc,
            }
        t = step_time(
            lambda p, x, model=model, spec=spec: mod.loss(model.replace(params=p), spec, x),
            model.params,
            tokens,
        )
        result[f"mod c={c:g}"] = {"compute": compute, "step_time": t / t_dense, **ev}
        rows.append(
            [
                f"MoD, {S} steps, capacity {c:g}",
                f"{compute:.2f}",
                f"{t / t_dense:.2f}",
                ev["topk"]["loss"],
                ev["causal"]["loss"],
                f"{ev['causal']['routed_fraction']:.3f} "
                f"(acc {ev['topk']['predictor_accuracy']:.3f})",
            ]
        )
        common.log(
            f"MoD c={c:g}: top-k {ev['topk']['loss']:.4f}, causal {ev['causal']['loss']:.4f}"
        )

    for n in sorted(small_depths):
        model = train(args, f"dense{n}", init(n), dense_loss(init(n)))
        loss = common.loss(model, data)
        t = step_time(dense_loss(model), model.params, tokens)
        result[f"dense{n}"] = {"compute": n / S, "loss": loss, "step_time": t / t_dense}
        rows.append([f"dense, {n} steps", f"{n / S:.2f}", f"{t / t_dense:.2f}", loss, "-", "-"])

    # sampling with the routed cache: entries per step, memory against a dense cache
    c0 = min(mod_models)
    model, spec = mod_models[c0]
    prompts = data[0][:4, :64]
    max_len = prompts.shape[1] + args.new_tokens - 1
    routed_len = max(1, int(np.ceil(2 * c0 * max_len)))
    policy = routed_decode.Routed(mod=spec, routed_len=routed_len)
    generation = dj.generate(model, prompts, args.new_tokens, temperature=0.0, policy=policy)
    toks, cache = generation.tokens, generation.cache
    full = routed_decode.RoutedCache.empty(
        model.config, routed_decode.Layout((False,) * S, max_len, max_len, 0.0), prompts.shape[0]
    )
    entries = cache.entries().mean(1)
    result["decode"] = {
        "entries_per_step": entries.tolist(),
        "max_len": max_len,
        "routed_len": routed_len,
        "cache_bytes": cache.nbytes,
        "dense_cache_bytes": full.nbytes,
        "sample": bytes(np.asarray(toks[0], np.uint8)).decode("utf-8", "replace"),
    }
    sections = [
        f"Models: llama-style, d_model {cfg.d_model}, trained {args.steps} steps of "
        f"{args.batch_size}x{args.seq_len} bytes with depthjax.adaptive.fit (lr {args.lr}); "
        f"MoD routes steps {routed}. 'compute' is the fraction of the dense model's "
        "block work (tokens x steps); 'step time' is a measured training step "
        "(forward + backward) relative to the dense model, same run.",
        "## Validation loss (nats/byte)\n\n"
        + common.md_table(
            [
                "model",
                "compute",
                "step time",
                "loss (top-k)",
                "loss (causal predictor)",
                "causal routed fraction",
            ],
            rows,
        ),
        f"## Sampling with the routed KV cache\n\nMoD capacity {c0:g}, {prompts.shape[0]} "
        f"prompts of {prompts.shape[1]} bytes + {args.new_tokens} new, routed steps capped at "
        f"{routed_len} entries per row. Mean cache entries per step: "
        + ", ".join(f"{e:.1f}" for e in entries)
        + f" (of {max_len} tokens); KV bytes "
        f"{cache.nbytes:,} vs {full.nbytes:,} for a dense cache.",
    ]
    common.write_results(args, out, "Experiment 9: Mixture-of-Depths", sections, result)


if __name__ == "__main__":
    main()
