"""Many programs of equal depth through one compiled forward.

Evaluates N random programs (block ids, gates, parallel flags) one after another through
one `jax.jit` function, and checks that exactly one compilation happened; reports time
per variant against a plain forward of the sequential program. Then evaluates a batch of
16 programs at once with `vmap` (one compilation), and checks that program-only depth
transforms allocate no new parameter buffers.

    python benchmarks/variants.py [--variants 32] [--depth 16]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import depthjax as dj
import depthjax.depth as D
from common import model_from_args, timed


def main():
    args, model, tokens = model_from_args(
        __doc__,
        depth=16,
        d_model=256,
        batch=4,
        seq_len=256,
        extra=lambda p: p.add_argument("--variants", type=int, default=32),
    )
    rng = np.random.default_rng(0)
    programs = [
        dj.Program.create(
            rng.integers(0, args.depth, args.depth),
            attn=rng.integers(0, 2, args.depth),
            mlp=rng.integers(0, 2, args.depth),
            parallel=np.r_[False, rng.random(args.depth - 1) < 0.2],
        )
        for _ in range(args.variants)
    ]

    forward = jax.jit(dj.apply)
    plain = timed(forward, model, tokens)
    t0 = time.perf_counter()
    for prog in programs:
        jax.block_until_ready(forward(model.with_program(prog), tokens))
    per_variant = (time.perf_counter() - t0) / len(programs)
    compiles = forward._cache_size()
    print(f"{args.variants} programs of depth {args.depth}: {compiles} compilation(s) (want 1)")
    print(
        f"plain forward {plain * 1e3:.2f}ms; per variant {per_variant * 1e3:.2f}ms "
        f"-> {per_variant / plain:.2f}x a plain forward"
    )

    batch = jax.tree.map(lambda *a: jnp.stack(a), *[p for p in programs[:16]])
    many = jax.jit(
        jax.vmap(lambda prog, m, t: dj.apply(m.replace(program=prog), t), in_axes=(0, None, None))
    )
    t_vmap = timed(many, batch, model, tokens)
    print(
        f"vmap over 16 programs: {many._cache_size()} compilation(s); "
        f"{t_vmap * 1e3:.2f}ms = {t_vmap / 16 / plain:.2f}x a plain forward per program"
    )

    pointers = lambda m: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(m.params)}
    before = pointers(model)
    edits = {
        "drop": D.drop(model, [1]),
        "drop_sublayers": D.drop_sublayers(model, attn=[0]),
        "repeat": D.repeat(model, [2, 3], 2),
        "reorder": D.reorder(model, [3, 2, 1]),
        "parallelize": D.parallelize(model, [[1, 2]]),
    }
    for name, edited in edits.items():
        new = pointers(edited) - before
        print(f"{name:15} new parameter buffers: {len(new)}")


if __name__ == "__main__":
    main()
