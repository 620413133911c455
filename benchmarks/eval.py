"""Task scoring: depthjax.eval's batched, padded engine against a per-request loop, and a
batch of programs in one call against one call per program.

A multiple-choice task of --examples examples x 4 choices (random byte contexts of 20-120
tokens, continuations of 2-12) on a random llama-style model:
1. dj.eval.multiple_choice (sorted, right-padded to length buckets, batches of 32)
   vs scoring each (context, choice) alone with a jitted forward of its exact length
   (one compile per length: the loop is timed warm, after its compiles);
2. --programs leave-one-out programs scored in one `programs=` call (one compile, lax.map
   over programs) vs one call per program.

    python benchmarks/eval.py [--examples 64] [--programs 8] [--depth 8] [--d-model 128]
"""

import jax
import numpy as np

import depthjax as dj
import depthjax.metrics as M
from common import clock_name, model_from_args, timed_interleaved


def main():
    args, model, _ = model_from_args(
        __doc__,
        depth=8,
        d_model=128,
        batch=1,
        seq_len=1,
        extra=lambda p: (
            p.add_argument("--examples", type=int, default=64),
            p.add_argument("--programs", type=int, default=8),
        ),
    )
    rng = np.random.default_rng(0)
    text = lambda n: "".join(chr(c) for c in rng.integers(97, 123, n))
    examples = [
        {
            "context": text(rng.integers(20, 120)),
            "choices": [text(rng.integers(2, 12)) for _ in range(4)],
            "label": 0,
        }
        for _ in range(args.examples)
    ]
    task = dj.eval.MultipleChoice(examples)
    requests = task.requests(model)

    forward = jax.jit(lambda m, t: dj.apply(m, t))

    def loop():
        out = []
        for ctx, cont in requests:
            seq = np.concatenate([ctx, cont])
            logits = np.asarray(forward(model, seq[None, :-1])[0], np.float64)
            logp = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            rows = np.arange(len(seq) - 1 - len(cont), len(seq) - 1)
            out.append(logp[rows, seq[rows + 1]].sum())
        return np.array(out)

    # best of 3 interleaved runs, warm (compiles excluded), by this process's CPU time on
    # a CPU: the shared machine's load moves wall time by more than these ratios
    t = timed_interleaved({"batched": lambda: task.evaluate(model), "loop": loop})
    batched, naive = t["batched"], t["loop"]
    ll = np.concatenate([np.ravel(x) for x in task.evaluate(model)["loglikelihoods"]])
    err = np.abs(ll - loop()).max()
    print(
        f"{len(requests)} requests: batched {batched * 1e3:.0f} ms, per-request loop "
        f"{naive * 1e3:.0f} ms -> {naive / batched:.1f}x faster (max |diff| {err:.1e}; "
        f"best of 3 interleaved, {clock_name()})"
    )

    S = model.depth
    keep = 1 - np.eye(S)[: args.programs]
    programs = M.coalitions.programs_for(model, "block", keep)
    rows = [jax.tree.map(lambda a, k=k: a[k], programs) for k in range(args.programs)]
    t = timed_interleaved(
        {
            "one call": lambda: task.scores(model, programs),
            "each": lambda: [task.scores(model.with_program(p)) for p in rows],
        }
    )
    one_call, per_program = t["one call"], t["each"]
    print(
        f"{args.programs} programs: one call {one_call * 1e3:.0f} ms, one call each "
        f"{per_program * 1e3:.0f} ms -> {per_program / one_call:.2f}x"
    )


if __name__ == "__main__":
    main()
