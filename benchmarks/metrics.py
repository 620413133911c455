"""All leave-one-out ablations of a deep model after one compile, against separate
forward passes.

Goal (metrics issue): the 32 ablations of a 32-step model (plus the full model) take at
most 1.3x the time of 33 separate jitted forward passes, with exactly one compilation.
Also times the one-pass trace metrics and Shapley with a few permutations.

    python benchmarks/metrics.py [--depth 32] [--d-model 128] [--batch 8] [--seq-len 128]
"""

import time

import jax
import numpy as np

import depthjax as dj
import depthjax.metrics as M
from common import model_from_args, timed
from depthjax.loss import nll_sums
from depthjax.metrics import coalitions


def main():
    args, model, tokens = model_from_args(__doc__, depth=32, d_model=128, batch=8, seq_len=128)
    S = args.depth

    # Baseline: S + 1 separate forward passes (full model and each step dropped) through
    # one jitted loss function; programs have different depths, so give each its own
    # compile up front and time only the runs.
    loss = jax.jit(lambda m, t: nll_sums(dj.apply(m, t), t, np.ones(t.shape, np.float32)))
    variants = [model] + [dj.depth.drop(model, [i]) for i in range(S)]
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    t0 = time.perf_counter()
    for v in variants:
        jax.block_until_ready(loss(v, tokens))
    separate = time.perf_counter() - t0

    fn = coalitions._coalition_sums
    before = fn._cache_size()
    jax.block_until_ready(M.ablation(model, tokens).values)  # compile
    t_ablation = timed(lambda: M.ablation(model, tokens).values, repeat=3)
    compiles = fn._cache_size() - before
    print(
        f"{S} leave-one-out ablations (+ full model): {t_ablation:.3f}s after "
        f"{compiles} compilation(s); {S + 1} separate forwards: {separate:.3f}s"
    )
    ratio = t_ablation / separate
    print(
        f"ratio ablation / separate forwards: {ratio:.2f}x (goal <= 1.3x, one compilation): "
        f"{'met' if ratio <= 1.3 and compiles == 1 else 'NOT met'}"
    )

    trace_t = timed(lambda: M.trace_metrics(model, tokens)["block_influence"].values, repeat=3)
    fwd = jax.jit(dj.apply)
    plain = timed(fwd, model, tokens)
    print(
        f"all trace metrics in one pass: {trace_t * 1e3:.1f}ms = {trace_t / plain:.2f}x a "
        "plain forward"
    )
    t_shap = timed(lambda: M.shapley(model, tokens, num_permutations=2).values, repeat=1)
    print(f"Shapley, 2 permutations ({2 * (S + 1)} coalitions, deduplicated): {t_shap:.2f}s")


if __name__ == "__main__":
    main()
