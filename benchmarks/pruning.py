"""Pruning that pays: forward and train-step time and temp memory of pruned programs, as
ratios to the full program, in dj.apply (runtime skipping) and dj.specialize (the
program compiled as structure), next to the FLOP ratio.

Programs (depth d): full; 25% and 50% of attention sublayers gated off; 25% of blocks
gated off (both sublayers); 2 pairs of steps parallelized (same FLOPs: dj.specialize runs
each pair as one batched call). Goal: measured ratios within 10% of the FLOP ratio for
both paths, and the specialized parallel program faster than the full one.

    python benchmarks/pruning.py [--depth 8] [--d-model 512] [--batch 4] [--seq-len 1024]
                                 [--repeat 3] [--no-train]
"""

import jax
import jax.numpy as jnp

import depthjax as dj
from common import clock_name, model_from_args, spread, timed_interleaved
from depthjax.core.flops import forward_flops_per_token
from depthjax.core.loss import nll_sums


def variants(model):
    d, D = model.depth, dj.depth
    blocks = spread(d, 0.25)
    pairs = [[1, 2], [d - 3, d - 2]] if d >= 6 else [[0, 1]]
    return {
        "full": model,
        "attn -25%": D.drop_sublayers(model, attn=spread(d, 0.25)),
        "attn -50%": D.drop_sublayers(model, attn=spread(d, 0.5)),
        "blocks -25%": D.drop_sublayers(model, attn=blocks, mlp=blocks),
        "2 pairs parallel": D.parallelize(model, pairs),
    }


def temp_mib(jitted, *args) -> float:
    """XLA's temp buffer size (activations and intermediates) of the compiled function."""
    stats = jitted.lower(*args).compile().memory_analysis()
    return getattr(stats, "temp_size_in_bytes", float("nan")) / 2**20


def main():
    def extra(p):
        p.add_argument("--repeat", type=int, default=3)
        p.add_argument("--no-train", action="store_true", help="forward only")

    args, model, tokens = model_from_args(
        __doc__, depth=8, d_model=512, batch=4, seq_len=1024, extra=extra
    )
    mask = jnp.ones(tokens.shape, jnp.float32)
    loss = lambda logits: nll_sums(logits, tokens, mask)[0]
    apply_fwd = jax.jit(dj.apply)
    apply_train = jax.jit(jax.grad(lambda p, m, t: loss(dj.apply(m.replace(params=p), t))))
    spec_train = jax.jit(
        jax.grad(lambda p, f, t: loss(f.replace(model=f.model.replace(params=p))(t)))
    )
    T = args.seq_len
    programs = variants(model)
    fns, flops, mem = {}, {}, {}
    for name, m in programs.items():
        fast = dj.specialize(m)
        flops[name] = forward_flops_per_token(m.config, T, m.program)
        fns[name, "apply fwd"] = lambda m=m: apply_fwd(m, tokens)
        fns[name, "spec fwd"] = lambda f=fast: f(tokens)
        if not args.no_train:
            fns[name, "apply train"] = lambda m=m: apply_train(m.params, m, tokens)
            fns[name, "spec train"] = lambda m=m, f=fast: spec_train(m.params, f, tokens)
        mem[name, "apply mem"] = temp_mib(apply_fwd, m, tokens)
        mem[name, "spec mem"] = temp_mib(jax.jit(lambda f, t: f(t)), fast, tokens)
    times = timed_interleaved(fns, repeat=args.repeat)
    print(
        f"# llama d_model={args.d_model} depth={args.depth} batch={args.batch} seq={T}; "
        f"ratios to the full program (best of {args.repeat} interleaved runs, {clock_name()}; "
        "XLA temp memory)"
    )
    cols = ["apply fwd", "apply train", "spec fwd", "spec train"]
    print(
        f"{'program':<17}{'FLOPs':>8}"
        + "".join(f"{c:>13}" for c in cols)
        + f"{'spec/apply':>12}{'apply mem':>11}{'spec mem':>10}"
    )
    get = lambda name, c: times.get((name, c), float("nan"))
    for name in programs:
        cells = [get(name, c) / get("full", c) for c in cols]
        cells.append(get(name, "spec fwd") / get(name, "apply fwd"))
        cells += [mem[name, c] / mem["full", c] for c in ("apply mem", "spec mem")]
        print(
            f"{name:<17}{flops[name] / flops['full']:>8.3f}"
            + "".join(f"{x:>13.3f}" for x in cells[:4])
            + f"{cells[4]:>12.3f}{cells[5]:>11.3f}"
            f"{cells[6]:>10.3f}",
            flush=True,
        )
    print(
        "full program, absolute: "
        + ", ".join(f"{c} {get('full', c) * 1e3:.0f}ms" for c in cols if ("full", c) in times)
        + f"; temp memory apply {mem['full', 'apply mem']:.0f} MiB, "
        f"specialize {mem['full', 'spec mem']:.0f} MiB"
    )
    print(
        f"apply compiled {apply_fwd._cache_size()} forward(s) for the {len(programs)} "
        "programs (one per depth)"
    )


if __name__ == "__main__":
    main()
