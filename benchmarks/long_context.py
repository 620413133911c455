"""Long context: peak memory and time of block influence on one sequence, blockwise attention
(`ModelConfig.attention_chunk`, depthjax.core.blockwise) against dense T x S scores.

    nice python benchmarks/long_context.py                      # llama-small at 1k, 8k, 32k
    nice python benchmarks/long_context.py --seq 1024 4096 --chunk 256

Each setting runs in its own subprocess (peak RSS is per process: the kernel's VmHWM, read
at the child's end); the child prints one JSON line. Time is the child's CPU time (all
threads) of `dj.metrics.block_influence` on a [1, T] sequence: the first call (trace,
compile and run) and, unless --no-warm, a second call on the compiled function. Dense
attention is skipped where its scores alone would exceed --max-dense-gib (the script says
so). One run per setting: repeat the script for a spread. A second table gives the XLA temp
memory of one attention call and of its gradient (compiled, not run: dense included).
"""

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = "llama-small"


def child(seq: int, chunk: int, warm: bool) -> None:
    import jax
    import numpy as np

    import depthjax as dj

    cfg = dj.configs.get(MODEL).replace(attention_chunk=chunk)
    model = dj.init(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq)).astype(np.int32)
    t0 = time.process_time()
    scores = dj.metrics.block_influence(model, tokens)
    first = time.process_time() - t0
    second = None
    if warm:
        t0 = time.process_time()
        again = dj.metrics.block_influence(model, tokens)
        second = time.process_time() - t0
        assert np.allclose(again.values, scores.values)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(
        json.dumps(
            {
                "seq": seq,
                "chunk": chunk,
                "first_s": first,
                "second_s": second,
                "peak_gib": hwm / 2**20,
                "scores": [float(x) for x in scores.values],
            }
        )
    )


def run_child(seq: int, chunk: int, warm: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(seq), str(chunk)]
    cmd += [] if warm else ["--no-warm"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"child {seq} tokens, chunk {chunk} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_score_gib(seq: int) -> float:
    """GiB of one layer's float32 scores for one sequence (softmax adds as much again)."""
    import depthjax as dj

    return dj.configs.get(MODEL).n_heads * seq * seq * 4 / 2**30


def attention_temp_mib(seq: int, chunk: int) -> tuple[float, float]:
    """XLA temp memory (MiB) of one llama-small attention call on [1, seq] and of its
    gradient, from the compiled executable's memory analysis (compiled, not run)."""
    import jax
    import jax.numpy as jnp

    import depthjax as dj
    from depthjax.core.attention import attend

    cfg = dj.configs.get(MODEL)
    q = jax.ShapeDtypeStruct((1, seq, cfg.n_heads, cfg.head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, seq, cfg.n_kv_heads, cfg.head_dim), jnp.float32)
    f = lambda q, k, v: jnp.sum(attend(q, k, v, causal=True, chunk=chunk) ** 2)
    return tuple(
        jax.jit(g).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes / 2**20
        for g in (f, jax.grad(f, (0, 1, 2)))
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--chunk", type=int, default=512, help="attention_chunk (default: 512)")
    p.add_argument("--max-dense-gib", type=float, default=4.0)
    p.add_argument("--no-warm", action="store_true", help="time only the first call")
    p.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, warm=not args.no_warm)
        return
    import jax

    from depthjax.core.blockwise import use_blockwise

    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}; {MODEL}, one sequence")
    print("# time: child CPU seconds (all threads); peak: child VmHWM; one run each")
    print(
        "| tokens | attention | first call s | warm call s | peak RSS GiB | "
        "peak vs dense | warm time vs dense |"
    )
    print("|---|---|---|---|---|---|---|")
    for seq in args.seq:
        rows = {}
        if dense_score_gib(seq) > args.max_dense_gib:
            print(
                f"| {seq} | dense | skipped: one layer's scores alone are "
                f"{dense_score_gib(seq):.0f} GiB | | | | |"
            )
        else:
            rows["attention_chunk=0 (dense)"] = run_child(seq, 0, not args.no_warm)
        path = "blockwise" if use_blockwise(seq, seq, args.chunk) else "dense: below threshold"
        chunked = f"attention_chunk={args.chunk} ({path})"
        rows[chunked] = run_child(seq, args.chunk, not args.no_warm)
        dense = rows.get("attention_chunk=0 (dense)")
        for name, r in rows.items():
            warm = r["second_s"]
            peak_ratio = f"{r['peak_gib'] / dense['peak_gib']:.2f}x" if dense else "-"
            time_ratio = f"{warm / dense['second_s']:.2f}x" if dense and warm else "-"
            warm_text = f"{warm:.2f}" if warm is not None else "-"
            print(
                f"| {seq} | {name} | {r['first_s']:.2f} | {warm_text} | {r['peak_gib']:.2f} | "
                f"{peak_ratio} | {time_ratio} |",
                flush=True,
            )
        if dense:
            import numpy as np

            gap = np.max(np.abs(np.subtract(dense["scores"], rows[chunked]["scores"])))
            print(f"#   {seq} tokens: block influence, blockwise vs dense: max |diff| {gap:.1e}")
    print("\n# one attention call of llama-small (causal, float32): XLA temp memory, compiled")
    print("| tokens | dense fwd MiB | blockwise fwd MiB | dense grad MiB | blockwise grad MiB |")
    print("|---|---|---|---|---|")
    for seq in args.seq:
        (df, dg), (bf, bg) = attention_temp_mib(seq, 0), attention_temp_mib(seq, args.chunk)
        print(
            f"| {seq} | {df:.1f} | {bf:.1f} ({bf / df:.4f}x) | {dg:.1f} | "
            f"{bg:.1f} ({bg / dg:.4f}x) |"
        )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
