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
    print(f"# jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
          f"{jax.device_count()} device(s)")
