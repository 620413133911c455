"""Compile time and step time of the forward at several depths, scanned vs unrolled.

Goal (core issue): scanned compile time at depth 64 within 1.5x of depth 4, while the
unrolled forward's compile time grows with depth.

    python benchmarks/compile.py [--depths 4 16 64] [--d-model 256] [--seq-len 256]
"""

import argparse

import jax
import jax.numpy as jnp

import depthjax as dj
from common import compile_time, header, timed


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    header()
    tokens = jnp.zeros((args.batch, args.seq_len), jnp.int32)
    rows = {}
    for depth in args.depths:
        cfg = dj.configs.get(
            "llama-tiny", d_model=args.d_model, n_heads=4, n_kv_heads=4, n_layers=depth
        )
        model = dj.init(cfg, jax.random.key(0))
        for mode, unroll in (("scan", False), ("unrolled", True)):
            fwd = jax.jit(lambda m, t, u=unroll: dj.apply(m, t, unroll=u))
            rows[depth, mode] = (compile_time(fwd, model, tokens), timed(fwd, model, tokens))
            print(
                f"depth {depth:3} {mode:9} compile {rows[depth, mode][0]:7.2f}s  "
                f"step {rows[depth, mode][1] * 1e3:8.2f}ms",
                flush=True,
            )
    lo, hi = min(args.depths), max(args.depths)
    print(f"\ncompile time ratio depth {hi} / depth {lo}:")
    for mode in ("scan", "unrolled"):
        print(f"  {mode:9} {rows[hi, mode][0] / rows[lo, mode][0]:6.2f}x")
    ratio = rows[hi, "unrolled"][1] / rows[hi, "scan"][1]
    print(f"step time unrolled / scan at depth {hi}: {ratio:.2f}x")
    ok = rows[hi, "scan"][0] / rows[lo, "scan"][0] <= 1.5
    print(f"goal (scan compile at depth {hi} <= 1.5x depth {lo}): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
