"""Timing helpers shared by the benchmark scripts."""

import time

import jax


def timed(fn, *args, repeat: int = 5):
    """Median wall time (s) of fn(*args) after one warm-up call, blocking on the result."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compile_time(jitted, *args):
    """Seconds to trace, lower and compile `jitted` for these arguments."""
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def header():
    dev = jax.devices()[0]
    print(
        f"# jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{jax.device_count()} device(s)"
    )


def model_from_args(
    doc: str, *, depth: int, d_model: int, batch: int, seq_len: int, extra=lambda parser: None
):
    """Parse --depth/--d-model/--batch/--seq-len (and `extra` flags), print the header, and
    return (args, llama-tiny-shaped model, random byte tokens [batch, seq_len])."""
    import argparse

    import numpy as np

    import depthjax as dj

    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--d-model", type=int, default=d_model)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq-len", type=int, default=seq_len)
    extra(p)
    args = p.parse_args()
    header()
    cfg = dj.configs.get("llama-tiny", d_model=args.d_model, n_layers=args.depth)
    model = dj.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq_len)).astype(np.int32)
    return args, model, tokens
