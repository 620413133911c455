"""Real scale: a random ~1B Llama written by transformers, through the whole depthjax
pipeline, next to transformers doing what it can of the same work.

    python benchmarks/scale.py [--layers 16] [--d-model 2048] [--heads 32] [--kv-heads 4]
        [--d-ff 5632] [--vocab 32000] [--batch 4] [--seq-len 64] [--mc-items 8]
        [--latency-batches 1,4,16,64] [--latency-seq 16] [--json OUT]

The default shape is TinyLlama's with 16 layers (836M parameters, 1.6 GB of bfloat16
safetensors). transformers writes the checkpoint (the Python 3.11 reference environment,
DEPTHJAX_REF_PYTHON, default .venv-ref/bin/python); then, in this process, one stage at a
time: `dj.hf.load` in bfloat16 (and every weight read once) -> a forward pass with the loss
-> block influence -> every leave-one-out block ablation -> `dj.prune` of 25% of the
blocks by ablation -> `dj.recover(method="linear")` -> a multiple-choice task and
perplexity of the recovered model -> `dj.hf.save`. A transformers child does what it
can of the same work on the same tokens: `from_pretrained` in bfloat16 (every weight read
once), a forward pass with the loss, and each layer deleted and the forward rerun; a
second child reloads the export.

Per stage: wall time (compiles included: what the user waits for) and peak resident memory
(VmHWM after resetting it at the start of the stage, so the model already held counts).
Correctness: the export, reloaded by transformers, must give depthjax's logits of the
pruned program (both float32 compute on the same bfloat16 weights) within --tol of the
largest logit; the linear recovery adapters are not foldable into a Llama layer, so the
export drops them (dj.hf.save(drop_adapters=True)) and is the pruned model.

Then the latency curve: forward time of one batch [B, --latency-seq] against B, for the
full model, the pruned one (`dj.apply` and `dj.specialize`) and the recovered one, best
of --repeat interleaved runs (wall time), next to the FLOP ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings

import jax
import numpy as np

import depthjax as dj
from common import (
    TINYLLAMA,
    header,
    measured,
    run_ref,
    safetensors_bytes,
    timed_interleaved,
    write_llama,
)
from depthjax.core.flops import forward_flops_per_token
from depthjax.core.loss import nll_sums
from depthjax.files.corpus import stdlib_files
from depthjax.files.tokenizer import ByteTokenizer

EVAL_KEYS = ("acc", "acc_norm", "nats_per_token")

# The transformers side. argv: mode ("baseline" | "reload"), checkpoint dir, tokens .npy,
# then for "reload" the .npy to write float32 logits to. Prints one JSON line.
REF = """
import json, sys
import numpy as np, torch, transformers as tf
mode, directory = sys.argv[1], sys.argv[2]
tokens = torch.from_numpy(np.load(sys.argv[3])).long()
stages = {}

def stage(name, fn):
    out, seconds, peak = measured(fn)
    stages[name] = {"seconds": seconds, "peak_kib": peak}
    return out

def load():
    m = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    [float(p.sum()) for p in m.parameters()]  # from_pretrained maps the file lazily
    return m

def loss(m):
    with torch.no_grad():
        return float(m(tokens, labels=tokens, use_cache=False).loss)

model = stage("load", load)
if mode == "baseline":
    full = stage("forward", lambda: loss(model))
    layers = model.model.layers

    def ablations():
        deltas = []
        for i in range(len(layers)):
            model.model.layers = torch.nn.ModuleList(l for j, l in enumerate(layers) if j != i)
            deltas.append(loss(model) - full)
        model.model.layers = layers
        return deltas

    deltas = stage("ablations", ablations)
    print(json.dumps({"stages": stages, "loss": full, "deltas": deltas}))
else:
    with torch.no_grad():
        np.save(sys.argv[4], model.float()(tokens, use_cache=False).logits.numpy())
    print(json.dumps({"stages": stages}))
"""


def parse():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=TINYLLAMA["d_model"])
    p.add_argument("--heads", type=int, default=TINYLLAMA["heads"])
    p.add_argument("--kv-heads", type=int, default=TINYLLAMA["kv_heads"])
    p.add_argument("--d-ff", type=int, default=TINYLLAMA["d_ff"])
    p.add_argument("--vocab", type=int, default=TINYLLAMA["vocab"])
    p.add_argument("--batch", type=int, default=4, help="sequences for metrics, ablations")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--calib", type=int, default=4, help="calibration sequences (recovery)")
    p.add_argument("--prune", type=float, default=0.25, help="fraction of blocks removed")
    p.add_argument("--mc-items", type=int, default=8, help="multiple-choice examples")
    p.add_argument("--mc-context", type=int, default=2, help="context lines per example")
    p.add_argument("--ppl-docs", type=int, default=2, help="perplexity documents")
    p.add_argument("--ppl-bytes", type=int, default=128, help="bytes kept of each document")
    p.add_argument("--latency-batches", default="1,4,16,64")
    p.add_argument("--latency-seq", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2, help="timed latency runs (after 1 warm-up)")
    p.add_argument("--tol", type=float, default=1e-2, help="export check: max |diff| / max |logit|")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def main():
    args = parse()
    header()
    work = tempfile.mkdtemp(prefix="depthjax-scale-")
    ckpt = args.dir or os.path.join(work, "llama")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        n = write_llama(
            ckpt,
            args.layers,
            d_model=args.d_model,
            heads=args.heads,
            kv_heads=args.kv_heads,
            d_ff=args.d_ff,
            vocab=args.vocab,
        )
        print(f"transformers wrote {n / 1e6:.0f}M parameters in {time.perf_counter() - t0:.0f}s")
    print(f"checkpoint: {safetensors_bytes(ckpt) / 1e9:.2f} GB of bfloat16 safetensors", flush=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len)).astype(np.int32)
    calib = rng.integers(0, args.vocab, (args.calib, args.seq_len)).astype(np.int32)
    tokens_npy = os.path.join(work, "tokens.npy")
    np.save(tokens_npy, tokens)

    ref = run_ref(REF, "baseline", ckpt, tokens_npy)
    rows = {}

    def stage(name, fn):
        out, seconds, peak = measured(fn)
        rows[name] = {"seconds": seconds, "peak_kib": peak}
        print(f"  {name}: {seconds:.1f}s, peak {peak / 2**20:.2f} GiB", flush=True)
        return out

    def load():
        m = dj.hf.load(ckpt, param_dtype="bfloat16", dtype="bfloat16", progress=False)
        [float(p.sum()) for p in jax.tree.leaves(m.params)]  # as the transformers side
        return m

    loss = jax.jit(lambda m, t: nll_sums(dj.apply(m, t), t)[0] / (t.shape[0] * (t.shape[1] - 1)))
    model = stage("load", load)
    full_loss = stage("forward", lambda: float(loss(model, tokens)))
    stage("block influence", lambda: np.asarray(dj.metrics.block_influence(model, tokens).values))
    ablation = stage("ablations", lambda: dj.metrics.ablation(model, tokens, unit="block"))
    n_prune = max(1, round(model.depth * args.prune))
    pruned = stage("prune", lambda: dj.prune(model, ablation, n_prune, unit="block"))
    recovered = stage("recover linear", lambda: dj.recover(pruned, model, calib, method="linear"))
    byte = ByteTokenizer()
    mc = dj.eval.corpus_tasks.next_line(
        args.mc_items, context_lines=args.mc_context, tokenizer=byte
    )
    docs = [f.read_text()[: args.ppl_bytes] for f in stdlib_files("valid")[: args.ppl_docs]]

    def evaluate():
        acc = mc.evaluate(recovered)
        ppl = dj.eval.perplexity(recovered, docs, tokenizer=byte)
        return {k: float(v) for k, v in {**acc, **ppl}.items() if k in EVAL_KEYS}

    evals = stage("eval (recovered)", evaluate)
    export = os.path.join(work, "export")
    with warnings.catch_warnings():  # the warning naming the adapters the export leaves out
        warnings.filterwarnings("ignore", message="drop_adapters=True")
        stage("export", lambda: dj.hf.save(recovered, export, drop_adapters=True, progress=False))
    logits_npy = os.path.join(work, "logits.npy")
    reload = run_ref(REF, "reload", export, tokens_npy, logits_npy)
    f32 = pruned.replace(config=pruned.config.replace(dtype="float32"))
    ours = np.asarray(dj.apply(f32, tokens), np.float32)
    theirs = np.load(logits_npy)
    export_err = float(np.abs(ours - theirs).max() / np.abs(ours).max())

    tf_stages = {**ref["stages"], "reload in transformers": reload["stages"]["load"]}
    dj_loss_deltas = np.asarray(ablation.values)
    report_stages(rows, tf_stages)
    print(
        f"\nloss of the full model: depthjax {full_loss:.4f}, transformers {ref['loss']:.4f}; "
        f"leave-one-out deltas differ by at most "
        f"{np.abs(dj_loss_deltas - np.asarray(ref['deltas'])).max():.2e} (both bfloat16)"
    )
    removed = sorted(set(range(model.depth)) - set(np.asarray(pruned.program.block).tolist()))
    print(f"pruned blocks (lowest leave-one-out loss rise): {removed}")
    print(
        f"recovered model: next_line acc {evals['acc']:.3f} (acc_norm {evals['acc_norm']:.3f}, "
        f"{args.mc_items} items, chance 0.25), {evals['nats_per_token']:.3f} nats/token on "
        f"{args.ppl_docs} documents of {args.ppl_bytes} bytes"
    )
    ok = export_err <= args.tol
    print(
        f"export reloaded in transformers: max |logit diff| / max |logit| = {export_err:.2e} "
        f"(float32 compute, tolerance {args.tol:g}) {'ok' if ok else 'FAILED'}"
    )
    latency = latency_curve(args, {"full": model, "pruned": pruned, "recovered": recovered})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "depthjax": rows,
                    "transformers": tf_stages,
                    "export_error": export_err,
                    "evals": evals,
                    "latency": latency,
                },
                f,
                indent=1,
            )
    shutil.rmtree(work)
    if not ok:
        raise SystemExit(f"export check failed: {export_err:.2e} > {args.tol:g}")


def report_stages(rows: dict, tf_stages: dict) -> None:
    """One line per stage: depthjax's time and peak RSS, transformers' where it does the
    same work, and the ratios."""
    gib = lambda r: r["peak_kib"] / 2**20
    print(
        f"\n{'stage':<30}{'depthjax s':>11}{'peak GiB':>9}{'transformers s':>16}"
        f"{'peak GiB':>9}{'time ratio':>11}{'RSS ratio':>10}"
    )
    for name in [*rows, "reload in transformers"]:
        ours, theirs = rows.get(name), tf_stages.get(name)
        line = f"{name:<30}"
        line += f"{ours['seconds']:>11.1f}{gib(ours):>9.2f}" if ours else f"{'-':>11}{'':>9}"
        line += f"{theirs['seconds']:>16.1f}{gib(theirs):>9.2f}" if theirs else f"{'-':>16}"
        if ours and theirs:
            line += f"{ours['seconds'] / theirs['seconds']:>11.2f}{gib(ours) / gib(theirs):>10.2f}"
        print(line)


def latency_curve(args, models: dict) -> dict:
    """Wall time of one forward [B, T] per model and batch size B, best of args.repeat
    interleaved runs; the pruned one also through dj.specialize."""
    T = args.latency_seq
    fwd = jax.jit(dj.apply)
    fast = dj.specialize(models["pruned"])
    programs = {**models, "pruned, specialize": models["pruned"]}
    flops = {n: forward_flops_per_token(m.config, T, m.program) for n, m in programs.items()}
    rng = np.random.default_rng(1)
    out = {}
    print(
        f"\nforward latency, ms per batch of [B, {T}] tokens (best of {args.repeat} "
        f"interleaved runs after a warm-up, wall time); speed-up over full in brackets"
    )
    print(f"{'B':>4}" + "".join(f"{n:>26}" for n in programs))
    for B in map(int, args.latency_batches.split(",")):
        toks = rng.integers(0, args.vocab, (B, T)).astype(np.int32)
        fns = {n: (lambda m=m, t=toks: fwd(m, t)) for n, m in models.items()}
        fns["pruned, specialize"] = lambda t=toks: fast(t)
        times = timed_interleaved(fns, repeat=args.repeat, clock=time.perf_counter)
        out[B] = {n: t * 1e3 for n, t in times.items()}
        print(
            f"{B:>4}"
            + "".join(f"{t * 1e3:>17.1f} ({times['full'] / t:4.2f}x)" for n, t in times.items()),
            flush=True,
        )
    print(
        "FLOP ratio to full: "
        + ", ".join(f"{n} {f / flops['full']:.3f}" for n, f in flops.items())
        + " (the recovery adapters' rank-16 maps are not counted)"
    )
    return {"ms": out, "flop_ratio": {n: f / flops["full"] for n, f in flops.items()}}


if __name__ == "__main__":
    main()
