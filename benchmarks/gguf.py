"""Pruning that pays where the model is served: llama.cpp speed of depthjax's GGUF exports.

A random-weight Llama (default d_model 1024, 16 layers, 16 heads) and its pruned
programs, each written by dj.gguf.save and run by llama.cpp (llama-cpp-python):
prompt processing (one batch of --prompt tokens) and generation (--gen tokens, one at a
time after that prompt) tokens/s, as ratios to the full model, next to the FLOP ratio
(depthjax.core.flops at the prompt length) and the KV-cache bytes per token (llama.cpp's
default f16 cache: 2 x kv_heads x head_dim x 2 bytes per kept attention layer). llama.cpp
runs with flash attention on: without it, it pads every layer's V cache to the widest
layer's, so layers with 0 KV heads would still hold a V cache.

Programs: full (llama graph); 25% and 50% of attention sublayers gated off (deci graph,
head counts 0 there); 25% of blocks gated off (those steps are left out: llama graph).
Timing: the variants run in turn --repeat times and each keeps its fastest run, measured
in this process's CPU seconds with one llama.cpp thread (--threads), so other jobs on a
shared machine do not count.

    python benchmarks/gguf.py [--d-model 1024] [--depth 16] [--heads 16] [--kv-heads 16]
                              [--prompt 256] [--gen 64] [--dtype f16] [--repeat 5]
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

import depthjax as dj
from common import spread
from depthjax.core.flops import forward_flops_per_token


def variants(model):
    d, D = model.depth, dj.depth
    blocks = spread(d, 0.25)
    return {
        "full": model,
        "attn -25%": D.drop_sublayers(model, attn=spread(d, 0.25)),
        "attn -50%": D.drop_sublayers(model, attn=spread(d, 0.5)),
        "blocks -25%": D.drop_sublayers(model, attn=blocks, mlp=blocks),
    }


def run(llm, prompt, n_gen, clock):
    """(prompt seconds, generation seconds) of one prompt batch and n_gen single tokens."""
    llm.reset()
    t0 = clock()
    llm.eval(prompt)
    t1 = clock()
    token = int(np.argmax(llm.scores[len(prompt) - 1]))
    for _ in range(n_gen):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return t1 - t0, clock() - t1


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--dtype", default="f16", choices=dj.gguf.DTYPES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    # This script is named gguf.py too: drop its folder from the path (common is imported
    # already) so that `import gguf` inside depthjax finds the package, not this file.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [d for d in sys.path if os.path.abspath(d or ".") != here]
    import llama_cpp

    cfg = dj.configs.get(
        "llama-tiny",
        d_model=args.d_model,
        n_layers=args.depth,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=max(args.prompt + args.gen + 8, 512),  # llama.cpp contexts are >= 256
    )
    model = dj.init(cfg, jax.random.key(0))
    models = variants(model)
    prompt = np.random.default_rng(0).integers(0, 256, args.prompt).tolist()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    print(
        f"# llama.cpp (llama-cpp-python {llama_cpp.__version__}) on {os.cpu_count()} CPUs, "
        f"{args.threads} thread(s); d_model {cfg.d_model}, {cfg.depth} layers, heads "
        f"{cfg.n_heads}/{cfg.n_kv_heads}, d_ff {cfg.d_ff}, {args.dtype}; prompt "
        f"{args.prompt}, generate {args.gen}; best of {args.repeat}, "
        f"{'CPU seconds of this process' if clock is time.process_time else 'wall time'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        llms, info = {}, {}
        for name, m in models.items():
            path = os.path.join(tmp, name.replace(" ", "").replace("%", "") + ".gguf")
            t0 = time.perf_counter()
            info[name] = dj.gguf.save(m, path, dtype=args.dtype)
            size = os.path.getsize(path) / 2**20
            print(
                f"# {name}: {info[name]['architecture']} graph, {len(info[name]['steps'])} "
                f"layers, {size:.0f} MiB, written in {time.perf_counter() - t0:.1f}s"
            )
            llms[name] = llama_cpp.Llama(
                model_path=path,
                n_ctx=args.prompt + args.gen + 8,
                n_batch=args.prompt,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                flash_attn=True,  # without it llama.cpp pads every layer's V cache to the max
                logits_all=True,
                verbose=False,
            )
        best = {name: [float("inf"), float("inf")] for name in models}
        for llm in llms.values():  # warm-up
            run(llm, prompt[:16], 2, clock)
        for _ in range(args.repeat):
            for name, llm in llms.items():
                pp, gen = run(llm, prompt, args.gen, clock)
                best[name] = [min(best[name][0], pp), min(best[name][1], gen)]
    full_flops = forward_flops_per_token(cfg, args.prompt, model.program)
    kv_full = None
    print(
        f"{'program':<12} {'pp tok/s':>9} {'pp x':>6} {'gen tok/s':>10} {'gen x':>6} "
        f"{'FLOPs':>6} {'KV B/token':>11} {'KV x':>6}"
    )
    for name, m in models.items():
        pp_rate, gen_rate = args.prompt / best[name][0], args.gen / best[name][1]
        kv = 2 * sum(info[name]["head_count_kv"]) * cfg.head_dim * 2  # f16 K and V
        kv_full = kv_full or kv
        base_pp, base_gen = args.prompt / best["full"][0], args.gen / best["full"][1]
        flops = forward_flops_per_token(cfg, args.prompt, m.program) / full_flops
        print(
            f"{name:<12} {pp_rate:>9.1f} {pp_rate / base_pp:>6.2f} {gen_rate:>10.2f} "
            f"{gen_rate / base_gen:>6.2f} {flops:>6.2f} {kv:>11,} {kv / kv_full:>6.2f}"
        )


if __name__ == "__main__":
    main()
