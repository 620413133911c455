"""Timing helpers shared by the benchmark scripts."""

import time

import jax


def timed(fn, *args, repeat: int = 5, clock=time.perf_counter):
    """Median time (s) of fn(*args) after one warm-up call, blocking on the result.

    clock: wall time by default; `compute_clock()` for work done rather than elapsed."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = clock()
        jax.block_until_ready(fn(*args))
        times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


def compute_clock():
    """This process's CPU time on a CPU backend (other jobs sharing the cores do not count),
    wall time on an accelerator (where the host clock says nothing about device work)."""
    return time.process_time if jax.default_backend() == "cpu" else time.perf_counter


def timed_interleaved(fns: dict, repeat: int = 3, clock=None) -> dict:
    """{name: best time (s)} of each zero-argument fn, after one warm-up call each, timing
    the fns in turn `repeat` times: on a shared machine whose load drifts, ratios of
    interleaved minima are far steadier than medians taken one fn after another.

    clock: time.perf_counter (wall) or time.process_time (CPU seconds of this process, all
    threads: on a CPU backend shared with other jobs, the work done rather than the wait);
    default: process time on CPU, wall time on accelerators."""
    clock = clock or compute_clock()
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = clock()
            jax.block_until_ready(fn())
            best[name] = min(best[name], clock() - t0)
    return best


def clock_name() -> str:
    return "CPU seconds of this process" if jax.devices()[0].platform == "cpu" else "wall time"


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
