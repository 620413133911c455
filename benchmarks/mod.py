"""Mixture-of-Depths: does compute really drop with capacity?

Times a jitted training step (forward + backward, the loss mod.loss) and a forward of a
model whose routed steps (every other step, as in the paper, or --routed all) take the top
`capacity` fraction of tokens, against the dense model (dj.apply, same depth) in the same
run. The routed blocks really run on the gathered k = capacity * T tokens, so the ideal
ratio is (dense steps + routed steps * capacity) / depth, plus the routers' and the
gather/scatter's overhead.

    python benchmarks/mod.py [--depth 8] [--d-model 256] [--batch 8] [--seq-len 512]
"""

import jax
import optax

import depthjax as dj
from common import model_from_args, timed
from depthjax.adaptive import mod


def main():
    args, model, tokens = model_from_args(
        __doc__,
        depth=8,
        d_model=256,
        batch=8,
        seq_len=512,
        extra=lambda p: (
            p.add_argument("--routed", choices=("alternate", "all"), default="alternate"),
            p.add_argument("--capacities", default="1,0.5,0.25,0.125"),
        ),
    )
    steps = list(range(1, args.depth, 2)) if args.routed == "alternate" else list(range(args.depth))
    routed_model, _ = mod.attach(model, steps, 1.0, jax.random.key(1))

    def dense_loss(p, t):
        logits = dj.apply(model.replace(params=p), t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    dense_grad = jax.jit(jax.grad(dense_loss))
    dense_fwd = jax.jit(lambda p, t: dj.apply(model.replace(params=p), t))
    t_grad = timed(dense_grad, model.params, tokens, repeat=3)
    t_fwd = timed(dense_fwd, model.params, tokens, repeat=3)
    print(f"routed steps {steps} of {args.depth}; tokens {tokens.shape}")
    print(
        f"{'model':<18} {'train step ms':>13} {'ratio':>6} {'forward ms':>11} {'ratio':>6} "
        f"{'ideal':>6}"
    )
    print(
        f"{'dense':<18} {t_grad * 1e3:>13.1f} {1.0:>6.2f} {t_fwd * 1e3:>11.1f} {1.0:>6.2f} "
        f"{1.0:>6.2f}"
    )
    for c in (float(x) for x in args.capacities.split(",")):
        spec = mod.MoD.create(args.depth, steps, c)
        grad = jax.jit(
            jax.grad(lambda p, t, spec=spec: mod.loss(routed_model.replace(params=p), spec, t)[0])
        )
        fwd = jax.jit(lambda p, t, spec=spec: mod.apply(routed_model.replace(params=p), spec, t)[0])
        g = timed(grad, routed_model.params, tokens, repeat=3)
        f = timed(fwd, routed_model.params, tokens, repeat=3)
        ideal = (
            args.depth - len(steps) + len(steps) * spec.tokens_routed(args.seq_len) / args.seq_len
        ) / args.depth
        print(
            f"{f'MoD capacity {c:g}':<18} {g * 1e3:>13.1f} {g / t_grad:>6.2f} {f * 1e3:>11.1f} "
            f"{f / t_fwd:>6.2f} {ideal:>6.2f}"
        )


if __name__ == "__main__":
    main()
