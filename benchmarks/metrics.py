"""Coalition metrics after one compile, against plain forward passes: every leave-one-out
ablation, and a batch of gate-only programs, by each evaluation strategy.

Goals (issue 13): the 16 leave-one-out ablations of a 16-step model (plus the full model)
in <= 0.6x the time of 17 plain forwards, one compilation; 64 gate-only programs in
<= 1.0x the time of 64 plain forwards with weight memory flat (no per-program copy of the
gathered rows, which the old path made by vmapping whole programs). Also times the
one-pass trace metrics and Shapley with a few permutations.

    python benchmarks/metrics.py [--depth 16] [--d-model 128] [--batch 8] [--seq-len 128]
                                 [--programs 64]
"""

import time

import jax
import numpy as np

import depthjax as dj
import depthjax.metrics as M
from common import model_from_args, timed
from depthjax.core.loss import nll_sums
from depthjax.metrics import coalitions as C


@jax.jit
def _old_sums(model, programs, tokens_BT, mask_BT):
    """The path before issue 13: vmap over whole programs (block ids batched), so each
    program of a chunk gathers its own copy of every row."""
    chunk = C.chunk_size(programs.block.shape[0], tokens_BT.shape, model.config)
    one = lambda p: nll_sums(
        dj.apply(model.replace(program=p), tokens_BT, mask=mask_BT), tokens_BT, mask_BT
    )
    return jax.lax.map(one, programs, batch_size=chunk)


def temp_mib(jitted, *args, **kwargs) -> float:
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    return getattr(stats, "temp_size_in_bytes", float("nan")) / 2**20


def main():
    args, model, tokens = model_from_args(
        __doc__,
        depth=16,
        d_model=128,
        batch=8,
        seq_len=128,
        extra=lambda p: p.add_argument("--programs", type=int, default=64),
    )
    S, K = args.depth, args.programs
    mask = np.ones(tokens.shape, np.float32)
    loss = jax.jit(lambda m, t: nll_sums(dj.apply(m, t), t, mask))
    plain = timed(loss, model, tokens)
    print(f"plain forward + loss: {plain * 1e3:.1f}ms")

    # Baseline of the metrics issue: S + 1 separate forwards of the dropped models (each
    # its own depth and compile; only the runs are timed).
    variants = [model] + [dj.depth.drop(model, [i]) for i in range(S)]
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    t0 = time.perf_counter()
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    separate = time.perf_counter() - t0

    print(f"\n## all {S} leave-one-out ablations (+ the full model)")
    keep = np.vstack([np.ones(S), 1 - np.eye(S)])
    attn, mlp = C.coalition_gates(model, "block", keep)
    costs = C.evaluation_costs(model, attn, mlp, args.seq_len)
    for strategy in ("batched", "prefix", "auto"):
        run = lambda strategy=strategy: M.coalition_measures(
            model, tokens, "block", keep, strategy=strategy
        )
        jax.block_until_ready(run())
        t = timed(run, repeat=3)
        flops = costs[strategy] / costs["batched"] if strategy != "auto" else float("nan")
        print(
            f"{strategy:>8}: {t:.3f}s = {t / ((S + 1) * plain):.2f}x {S + 1} plain forwards, "
            f"{t / separate:.2f}x {S + 1} separate dropped forwards"
            + (
                f" (FLOPs {flops * (S + 1) * 1.0:.1f} forwards)"
                if strategy != "auto"
                else f" (picks {min(costs, key=costs.get)})"
            )
        )
    ratio = timed(lambda: M.ablation(model, tokens).values, repeat=3) / ((S + 1) * plain)
    compiles = C.prefix_sums._cache_size() + C.batched_sums._cache_size()
    print(
        f"M.ablation: {ratio:.2f}x {S + 1} plain forwards (goal <= 0.6x): "
        f"{'met' if ratio <= 0.6 else 'NOT met'}; {compiles} compilation(s) per strategy"
    )

    print(f"\n## {K} gate-only programs (random sublayer coalitions)")
    keep = np.random.default_rng(1).integers(0, 2, (K, 2 * S)).astype(np.int8)
    attn, mlp = C.coalition_gates(model, "sublayer", keep)
    programs = C.programs_for(model, "sublayer", keep)
    t_old = timed(_old_sums, model, programs, tokens, mask, repeat=3)
    print(f"     old: {t_old / (K * plain):.2f}x {K} plain forwards (vmap over whole programs)")
    costs = C.evaluation_costs(model, attn, mlp, args.seq_len)
    best = None
    for strategy in ("batched", "prefix", "auto"):
        run = lambda strategy=strategy: M.coalition_measures(
            model, tokens, "sublayer", keep, strategy=strategy
        )
        jax.block_until_ready(run())
        t = timed(run, repeat=3)
        best = t if strategy == "auto" else best
        print(
            f"{strategy:>8}: {t / (K * plain):.2f}x {K} plain forwards, {t_old / t:.2f}x "
            f"faster than old"
            + (f" (picks {min(costs, key=costs.get)})" if strategy == "auto" else "")
        )
    print(f"goal <= 1.0x: {'met' if best <= K * plain else 'NOT met'}")
    chunk = C.chunk_size(K, tokens.shape, model.config)
    row_mib = sum(x[0].nbytes for x in jax.tree.leaves(model.params["blocks"])) / 2**20
    mem_old = temp_mib(_old_sums, model, programs, tokens, mask)
    mem_new = temp_mib(C.batched_sums, model, attn, mlp, tokens, mask, measure="loss", chunk=chunk)
    mem_prefix = temp_mib(
        C.prefix_sums,
        model,
        attn,
        mlp,
        C.prefix_starts(model.program, attn, mlp),
        tokens,
        mask,
        measure="loss",
    )
    print(
        f"temp memory, chunks of {chunk}: old {mem_old:.1f} MiB, batched {mem_new:.1f} MiB, "
        f"prefix {mem_prefix:.1f} MiB (one row of the table: {row_mib:.2f} MiB)"
    )

    trace_t = timed(lambda: M.trace_metrics(model, tokens)["block_influence"].values, repeat=3)
    print(
        f"\nall trace metrics in one pass: {trace_t * 1e3:.1f}ms = {trace_t / plain:.2f}x a "
        "plain forward"
    )
    t_shap = timed(lambda: M.shapley(model, tokens, num_permutations=2).values, repeat=1)
    print(
        f"Shapley, 2 permutations ({2 * (S + 1)} coalitions, deduplicated): {t_shap:.2f}s "
        f"= {t_shap / (2 * (S + 1) * plain):.2f}x that many plain forwards"
    )


if __name__ == "__main__":
    main()
