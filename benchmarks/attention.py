"""Attention throughput: depthjax's Pallas kernel vs XLA, cuDNN and JAX's bundled Pallas kernel.

    python benchmarks/attention.py                 # GPU: the full table (bf16, B*S = 16k
                                                   # tokens, H*D = 2048, S in 1k/4k/16k)
    python benchmarks/attention.py --seq 4096 --head-dim 128 --causal

Prints TFLOP/s for forward and forward+backward and each implementation's ratio to cuDNN.
FLOPs count the four matmuls as 4*B*H*T*S*D for the forward (halved when causal) and 3.5x
that for forward+backward (the backward's five matmuls), the usual FlashAttention convention.
Each implementation is checked against XLA on the same inputs before it is timed.
On a machine without a GPU it says so and runs a tiny interpret-mode sanity check instead.
"""

import argparse
import math

import jax
import jax.numpy as jnp

from common import header, timed
from depthjax.kernels import flash_attention

TOKENS, WIDTH = 16 * 1024, 2048


def implementations(scale, causal, interpret=False):
    """name -> f(q, k, v) on [B, T, H, D]."""

    def dpa(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation=impl
        )

    def bundled(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention as jax_attention

        # Its sm_scale defaults to 1.0: pass the real scale.
        return jax_attention.mha(q, k, v, None, sm_scale=scale, causal=causal, interpret=interpret)

    impls = {
        "xla": dpa("xla"),
        "depthjax-pallas": lambda q, k, v: flash_attention(
            q, k, v, causal=causal, scale=scale, interpret=interpret
        ),
    }
    if not interpret:
        impls = {
            "xla": impls["xla"],
            "cudnn": dpa("cudnn"),
            "jax-pallas": bundled,
            "depthjax-pallas": impls["depthjax-pallas"],
        }
    return impls


def fwd_bwd(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def bench(S, D, causal, dtype, repeat, interpret=False, batch=None, width=WIDTH):
    B, H = batch or max(1, TOKENS // S), width // D
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, S, H, D), dtype) for key in keys)
    scale = 1 / math.sqrt(D)
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    impls = implementations(scale, causal, interpret)
    want = jax.jit(impls["xla"])(q, k, v).astype(jnp.float32)
    rows = {}
    for name, fn in impls.items():
        try:
            f, g = jax.jit(fn), jax.jit(fwd_bwd(fn))
            err = float(jnp.max(jnp.abs(f(q, k, v).astype(jnp.float32) - want)))
            t_f = timed(f, q, k, v, repeat=repeat)
            t_fb = timed(g, q, k, v, repeat=repeat)
            rows[name] = (flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12, err)
        except Exception as e:  # an implementation that cannot run this shape: say why
            print(f"  {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    base = rows.get("cudnn")
    for name, (tf, tfb, err) in rows.items():
        ratio = f"  {tf / base[0]:5.2f}x {tfb / base[1]:5.2f}x" if base else ""
        print(
            f"S={S:6d} D={D:3d} causal={causal!s:5} {name:16s} fwd {tf:8.2f} "
            f"fwd+bwd {tfb:8.2f} TFLOP/s{ratio}  max|err| {err:.1e}",
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--head-dim", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--causal", action="store_true", help="only causal (default: both)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    header()
    if jax.devices()[0].platform != "gpu":
        print(
            "No GPU: GPU timings need one. Running a tiny interpret-mode sanity check "
            "(correctness only; interpret-mode times mean nothing)."
        )
        rows = bench(128, 32, True, jnp.float32, repeat=1, interpret=True, batch=1, width=64)
        ok = rows["depthjax-pallas"][2] < 1e-4
        print("sanity check:", "OK" if ok else "MISMATCH")
        raise SystemExit(0 if ok else 1)
    print("columns: TFLOP/s forward, forward+backward; ratios to cuDNN; error vs XLA")
    for D in args.head_dim:
        for S in args.seq:
            for causal in [True] if args.causal else [False, True]:
                bench(S, D, causal, jnp.dtype(args.dtype), args.repeat)


if __name__ == "__main__":
    main()
