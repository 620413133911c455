"""Timing, memory and reference-environment helpers shared by the benchmark scripts."""

import ctypes
import ctypes.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
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


def spread(depth: int, fraction: float) -> list[int]:
    """`fraction` of the steps, evenly spread, never step 0 (the pruned programs of
    pruning.py and gguf.py)."""
    import numpy as np

    n = round(depth * fraction)
    return sorted({int(i) for i in np.linspace(depth - 1, 1, n)})


def clock_name() -> str:
    return "CPU seconds of this process" if jax.devices()[0].platform == "cpu" else "wall time"


def compile_time(jitted, *args):
    """Seconds to trace, lower and compile `jitted` for these arguments."""
    t0 = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - t0


def use_one_core() -> None:
    """Measure work, not the machine's state (CPU only; call before the first computation:
    XLA reads its flags when the backend starts):

    * one XLA thread pinned to one core: a FLOP ratio is a ratio of work, and the thread
      pool's spinning and hand-offs vary by ~15% between runs on a shared 2-core machine;
    * freed memory stays in the process (glibc `mallopt`): XLA:CPU allocates its temp
      buffer on every call, and glibc hands large blocks back to the kernel on free, so
      every call page-faults its temp buffer in afresh. That costs in proportion to the
      temp size, not the FLOPs: a `dj.specialize`d program with unrolled steps (more live
      buffers than one scan) spent 8x longer in its weight-slice copies for it."""
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD):
        libc.mallopt(option, 1 << 30)


def header():
    dev = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    print(
        f"# jax {jax.__version__} on {dev.platform} ({dev.device_kind}), "
        f"{jax.device_count()} device(s)"
        + (", one XLA thread on one core" if "multi_thread_eigen=false" in flags else "")
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
    p.add_argument(
        "--one-core",
        action="store_true",
        help="CPU only: one XLA thread pinned to one core (steadier ratios of work)",
    )
    extra(p)
    args = p.parse_args()
    if args.one_core:
        use_one_core()
    header()
    cfg = dj.configs.get("llama-tiny", d_model=args.d_model, n_layers=args.depth)
    model = dj.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq_len)).astype(np.int32)
    return args, model, tokens


# -- peak resident memory and the transformers reference environment -------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kib(key: str = "VmHWM:") -> int:
    """A /proc/self/status field in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Reset this process's VmHWM to its current resident size (Linux clear_refs 5), so the
    next `kib()` is the peak of what ran since."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measured(fn):
    """(fn(), wall seconds, peak resident KiB while it ran: the memory already held counts)."""
    reset_peak()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, kib("VmHWM:")


def with_rss_helpers(code: str) -> str:
    """`code` preceded by the source of kib, reset_peak and measured: a child in the
    reference environment (no jax, so it cannot import this module) measures as this
    process does."""
    helpers = "".join(inspect.getsource(f) + "\n" for f in (kib, reset_peak, measured))
    return "import time\n" + helpers + code


def ref_python() -> str:
    """The Python 3.11 interpreter with torch + transformers (DEPTHJAX_REF_PYTHON, default
    .venv-ref/bin/python)."""
    return os.environ.get("DEPTHJAX_REF_PYTHON") or os.path.join(REPO, ".venv-ref", "bin", "python")


def run_child(python: str, code: str, *, ref: bool, args=()) -> str:
    """Run `code` in a fresh `python` and return the last line it printed; exit with its
    output when it fails. ref: the transformers environment (no PYTHONPATH)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if ref:  # the repo's kernels/ folder would shadow the `kernels` package transformers probes
        env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [python, "-c", code, *map(str, args)],
        env=env,
        cwd=tempfile.gettempdir() if ref else REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        sys.exit(f"child failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def run_ref(code: str, *args) -> dict:
    """Run `code` (with the RSS helpers) in the transformers environment; it prints one JSON
    line, returned as a dict."""
    return json.loads(run_child(ref_python(), with_rss_helpers(code), ref=True, args=args))


# A random Llama in bfloat16, written by transformers: argv = dir, layers, d_model, heads,
# kv heads, d_ff, vocab. Prints its parameter count.
WRITE_LLAMA = """
import sys, torch, transformers as tf
torch.manual_seed(0)
d, L, D, H, K, F, V = sys.argv[1], *map(int, sys.argv[2:])
cfg = tf.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F,
    num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=K,
    max_position_embeddings=2048, tie_word_embeddings=False)
model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(d)
print(sum(p.numel() for p in model.parameters()))
"""

TINYLLAMA = dict(d_model=2048, heads=32, kv_heads=4, d_ff=5632, vocab=32000)


def write_llama(directory: str, layers: int, *, d_model, heads, kv_heads, d_ff, vocab) -> int:
    """Write a random bfloat16 Llama checkpoint with transformers; its parameter count."""
    args = (directory, layers, d_model, heads, kv_heads, d_ff, vocab)
    return int(run_child(ref_python(), WRITE_LLAMA, ref=True, args=args))


def safetensors_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if f.endswith(".safetensors")
    )
