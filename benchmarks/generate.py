"""Decode throughput and KV-cache bytes of pruned programs, as ratios to the full model,
through dj.generate on the DepthModel (one compiled scan, runtime skipping) and on
dj.specialize(model) (the program compiled as structure).

For the full program and for programs with 25% / 50% of attention sublayers gated off,
25% of blocks dropped and 2 pairs of steps parallelized: prefill a prompt, then time
`--new-tokens` greedy decode steps in dj.generate's compiled loop (its time for 1 + n
tokens minus its time for 1), at each batch size.

    python benchmarks/generate.py [--model llama-1b] [--dtype bfloat16] [--batches 1,32]
                                  [--prompt-len 1024] [--new-tokens 64]
"""

import argparse

import jax
import numpy as np

import depthjax as dj
from common import header, timed_interleaved


def spread(depth: int, fraction: float) -> list[int]:
    """`fraction` of the steps, evenly spread, never step 0 (kept: it matters most)."""
    n = round(depth * fraction)
    return sorted({int(i) for i in np.linspace(depth - 1, 1, n)})


def measure(model, batch, prompt_len, new_tokens):
    """(decode tokens/s, KV-cache bytes); `model` is a DepthModel or a dj.specialize'd one.
    Decode time is dj.generate's time for 1 + new_tokens tokens minus its time for 1 token
    (the prefill and the first token): both one compiled loop, greedy, timed in turns
    (best of 3, this process's CPU time on a CPU). NaN when the difference is not positive:
    the decode steps are lost in the timing noise."""
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, model.config.vocab_size)
    run = lambda n: dj.generate(model, prompt, n, temperature=0.0)
    t = timed_interleaved({"1": lambda: run(1).tokens, "n": lambda: run(1 + new_tokens).tokens})
    decode = t["n"] - t["1"]
    cache = run(1 + new_tokens).cache
    return (batch * new_tokens / decode if decode > 0 else float("nan")), cache.nbytes


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_cpu = jax.devices()[0].platform == "cpu"
    p.add_argument("--model", default="llama-small" if on_cpu else "llama-1b")
    p.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128 if on_cpu else 1024)
    p.add_argument("--new-tokens", type=int, default=16 if on_cpu else 64)
    args = p.parse_args()
    header()
    cfg = dj.configs.get(args.model, dtype=args.dtype)
    model = dj.init(cfg, jax.random.key(0))
    d = model.depth
    variants = {
        "full": model,
        "attn -25%": dj.depth.drop_sublayers(model, attn=spread(d, 0.25)),
        "attn -50%": dj.depth.drop_sublayers(model, attn=spread(d, 0.5)),
        "blocks -25%": dj.depth.drop(model, spread(d, 0.25)),
        "2 pairs ||": dj.depth.parallelize(model, [[1, 2], [d - 3, d - 2]]),
    }
    print(
        f"# {args.model} ({args.dtype}), depth {d}, prompt {args.prompt_len}, "
        f"{args.new_tokens} decode steps"
    )
    print(
        f"{'batch':>5} {'program':<12} {'path':<11} {'tokens/s':>10} {'KV MiB':>9} "
        f"{'speed ratio':>11} {'KV ratio':>8}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        base = None
        for name, m in variants.items():
            for path, runner in (("apply", m), ("specialize", dj.specialize(m))):
                tps, kv = measure(runner, batch, args.prompt_len, args.new_tokens)
                base = base or (tps, kv)
                print(
                    f"{batch:>5} {name:<12} {path:<11} {tps:>10.1f} {kv / 2**20:>9.1f} "
                    f"{tps / base[0]:>11.3f} {kv / base[1]:>8.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
