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
import numpy as np

import depthjax as dj
from common import model_from_args, timed
from depthjax.metrics.batches import nll_sums
from depthjax.train.flops import forward_flops_per_token


def spread(depth: int, fraction: float) -> list[int]:
    """`fraction` of the steps, evenly spread, never step 0."""
    n = round(depth * fraction)
    return sorted({int(i) for i in np.linspace(depth - 1, 1, n)})


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
    print(
        f"# llama d_model={args.d_model} depth={args.depth} batch={args.batch} seq={T}; "
        f"ratios to the full program (time, temp memory), measured in this run"
    )
    cols = [
        "FLOPs",
        "apply fwd",
        "apply train",
        "spec fwd",
        "spec train",
        "spec/apply fwd",
        "apply mem",
        "spec mem",
    ]
    print(f"{'program':<17}" + "".join(f"{c:>15}" for c in cols))
    base = None
    for name, m in variants(model).items():
        fast = dj.specialize(m)
        row = {"FLOPs": forward_flops_per_token(m.config, T, m.program)}
        row["apply fwd"] = timed(apply_fwd, m, tokens, repeat=args.repeat)
        row["spec fwd"] = timed(fast, tokens, repeat=args.repeat)
        if not args.no_train:
            row["apply train"] = timed(apply_train, m.params, m, tokens, repeat=args.repeat)
            row["spec train"] = timed(spec_train, m.params, fast, tokens, repeat=args.repeat)
        row["apply mem"] = temp_mib(apply_fwd, m, tokens)
        row["spec mem"] = temp_mib(jax.jit(lambda f, t: f(t)), fast, tokens)
        base = base or row
        cells = [row[c] / base[c] if c in row else float("nan") for c in cols[:5]]
        cells.append(row["spec fwd"] / row["apply fwd"])
        cells += [row[c] / base[c] for c in cols[6:]]
        print(f"{name:<17}" + "".join(f"{x:>15.3f}" for x in cells), flush=True)
        if name == "full":
            print(
                f"{'  (absolute)':<17}{'':>15}"
                + "".join(
                    f"{row[c] * 1e3:>13.1f}ms" if c in row else f"{'':>15}" for c in cols[1:5]
                ),
                flush=True,
            )
    print(
        f"apply compiled {apply_fwd._cache_size()} forward(s) for the {len(variants(model))} "
        "programs (one per depth)"
    )


if __name__ == "__main__":
    main()
