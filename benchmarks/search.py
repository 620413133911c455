"""Candidates per second: one generation of a program search scored as one batch of
padded programs through one compiled function, against separate forward passes.

The generation is every neighbour of the start program (drops, sublayer drops, loops,
swaps, parallel groups: depths S-1..S+1), as `dj.search` scores it. The alternatives
score the same programs one at a time through a jitted loss: programs of different
depths compile separately, so the first alternative is timed after every depth has been
compiled ("separate, warm"), and the second includes those compiles ("separate, cold",
what a loop over programs pays once). Per-example: (program, row) pairs, each scored on
its own row, against separate forwards on single rows.

    python benchmarks/search.py [--depth 8] [--d-model 64] [--batch 8] [--seq-len 128]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import depthjax as dj
from common import model_from_args
from depthjax import search
from depthjax.core.loss import nll_sums
from depthjax.search import evaluate as ev_lib


class Clock:
    """Wall seconds and CPU seconds of this process (all threads): on a shared machine
    the CPU time is the steadier measure of work."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def _separate(loss, models, tokens):
    """(cold Clock including compiles, warm Clock) of scoring `models` one at a time."""
    clocks = []
    for _ in range(2):
        with Clock() as c:
            for m in models:
                jax.block_until_ready(loss(m, tokens))
        clocks.append(c)
    return clocks


def main():
    args, model, tokens = model_from_args(__doc__, depth=8, d_model=64, batch=8, seq_len=128)
    space = search.Space(model)
    cands = space.neighbours(space.start)
    K = len(cands)
    depths = sorted({c.depth for c in cands})
    objective = search.loss([tokens])

    evaluator = ev_lib.Evaluator(space, objective)
    before = ev_lib.pooled_sums._cache_size()
    with Clock() as cold_batched:
        evaluator.pooled(cands)
    compiles = ev_lib.pooled_sums._cache_size() - before
    evaluator.scores.clear()
    with Clock() as batched:
        evaluator.pooled(cands)

    loss = jax.jit(lambda m, t: nll_sums(dj.apply(m, t), t, jnp.ones(t.shape, jnp.float32)))
    cold_sep, sep = _separate(loss, [space.to_model(c) for c in cands], tokens)
    print(
        f"one generation: {K} programs of depths {depths[0]}..{depths[-1]} (padded to "
        f"{space.max_depth}, chunks of {evaluator.chunk}), {args.batch}x{args.seq_len} "
        "tokens each; programs per second of wall time (of CPU time)"
    )
    rate = lambda c: f"{K / c.wall:8.1f} ({K / c.cpu:6.1f})"
    print(
        f"  batched (dj.search):  {rate(batched)}; first call {cold_batched.wall:.2f}s with "
        f"{compiles} compilation"
    )
    print(f"  separate, warm:       {rate(sep)}")
    print(
        f"  separate, cold:       {rate(cold_sep)}; {cold_sep.wall:.2f}s with {len(depths)} "
        "compilations"
    )
    print(
        f"  batched / separate, warm: {sep.wall / batched.wall:.2f}x wall "
        f"({sep.cpu / batched.cpu:.2f}x CPU); cold: {cold_sep.wall / cold_batched.wall:.2f}x "
        f"wall ({cold_sep.cpu / cold_batched.cpu:.2f}x CPU)"
    )

    # Per example: every (program, row) pair on its own row.
    rows = [
        {"tokens": tokens[r], "mask": np.ones(tokens.shape[1], np.float32)}
        for r in range(len(tokens))
    ]
    pairs = [(c, r) for c in cands for r in range(len(tokens))]
    evaluator.paired(pairs, rows)  # compile
    evaluator.scores.clear()
    with Clock() as paired:
        evaluator.paired(pairs, rows)
    singles = [(space.to_model(c), tokens[r : r + 1]) for c, r in pairs]
    for m, t in singles[: len(cands)]:  # one compile per depth
        jax.block_until_ready(loss(m, t))
    with Clock() as sep_rows:
        for m, t in singles:
            jax.block_until_ready(loss(m, t))
    print(
        f"per example: {len(pairs)} (program, row) pairs: batched {len(pairs) / paired.wall:.1f} "
        f"pairs/s, separate {len(pairs) / sep_rows.wall:.1f} pairs/s: "
        f"{sep_rows.wall / paired.wall:.2f}x wall ({sep_rows.cpu / paired.cpu:.2f}x CPU)"
    )


if __name__ == "__main__":
    main()
