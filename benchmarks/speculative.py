"""Self-speculative decoding vs plain decoding and exit-at-k, as ratios in one run.

For each model (`--model DIR`, native or Hugging Face; repeat the flag to compare models,
e.g. trained with and without the early-exit recipe by experiments/07_early_exit.py) and
each draft depth k (default depth/4 and depth/2): greedy-decode `--new-tokens` tokens after
prompts of real text (the embedded corpus' validation split) with

* the full model (plain decoding, the reference);
* exit-at-k (the first k steps alone: faster, but not the full model's output);
* self-speculative decoding with the first k steps as the draft (the full model's output
  exactly; checked here token for token against plain decoding).

Prints tokens/s, the speed ratio to plain decoding, the draft acceptance rate, tokens per
verification pass, and how often exit-at-k agrees with the full model. Every timing is the
median of --repeat calls of one compiled generation (compilation excluded), the methods
timed in turns so that load on a shared machine affects them alike.

    python benchmarks/speculative.py --model DIR [--model DIR] [--drafts 2,4]
        [--draft-tokens 4] [--batch 1] [--prompt-len 64] [--new-tokens 64] [--json OUT]
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import depthjax as dj
from common import header
from depthjax.files.corpus import sample_windows


def interleaved_seconds(fns: dict, repeat: int) -> dict:
    """Median wall time of each fn, timed in turns (one call of each per round), so that a
    shared machine's load drift hits every method alike. fns are warm (compiled) already."""
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def measure(model, prompts, new_tokens: int, drafts, draft_tokens: int, repeat: int) -> list[dict]:
    """One row per decoding method: tokens/s, ratio to plain, acceptance, agreement."""
    run = lambda **kw: dj.generate(model, prompts, new_tokens, temperature=0.0, **kw)
    methods = {("plain", model.depth): {}}
    for k in drafts:
        methods[("exit-at-k", k)] = dict(exit_at=k)
        methods[("speculative", k)] = dict(draft=k, draft_tokens=draft_tokens)
    outs = {m: run(**kw) for m, kw in methods.items()}  # compiles; the checked outputs
    seconds = interleaved_seconds(
        {m: (lambda kw=kw: run(**kw).tokens) for m, kw in methods.items()}, repeat
    )
    want = np.asarray(outs[("plain", model.depth)].tokens)
    tokens = prompts.shape[0] * new_tokens
    base = tokens / seconds[("plain", model.depth)]
    rows = []
    for (method, k), out in outs.items():
        got = np.asarray(out.tokens)
        if method == "speculative" and not np.array_equal(got, want):
            raise AssertionError(f"draft={k}: speculative output differs from plain decoding")
        tps = tokens / seconds[(method, k)]
        row = dict(
            method=method,
            k=k,
            tokens_per_s=tps,
            ratio=tps / base,
            agreement=float((got == want).mean()),
        )
        if out.draft is not None:
            row.update(
                acceptance=out.draft.acceptance,
                tokens_per_pass=float(np.sum(out.lengths) - prompts.shape[0])
                / max(int(np.sum(out.draft.rounds)), 1),
            )
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", action="append", required=True, help="model directory (repeat to compare models)"
    )
    p.add_argument("--drafts", default=None, help="draft depths k (default: depth/4,depth/2)")
    p.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    header()
    prompts = sample_windows(args.batch, args.prompt_len, seed=args.seed, split="valid")
    results = {}
    print(
        f"# greedy, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, {args.draft_tokens} draft tokens per round"
    )
    print(
        f"{'model':<24} {'method':<12} {'k':>3} {'tokens/s':>9} {'ratio':>6} "
        f"{'accept':>7} {'tok/pass':>8} {'agree':>6}"
    )
    for path in args.model:
        model = dj.files.ModelDir.read(path).model
        d = model.depth
        drafts = (
            [int(k) for k in args.drafts.split(",")]
            if args.drafts
            else sorted({max(1, d // 4), max(1, d // 2)})
        )
        name = Path(path).parent.name if Path(path).name == "model" else Path(path).name
        rows = measure(model, prompts, args.new_tokens, drafts, args.draft_tokens, args.repeat)
        results[name] = rows
        for r in rows:
            fmt = lambda key, spec, r=r: format(r[key], spec) if key in r else "-"
            print(
                f"{name[:24]:<24} {r['method']:<12} {r['k']:>3} {r['tokens_per_s']:>9.1f} "
                f"{r['ratio']:>6.2f} {fmt('acceptance', '>7.1%'):>7} "
                f"{fmt('tokens_per_pass', '>8.2f'):>8} {fmt('agreement', '>6.1%'):>6}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"device": jax.devices()[0].device_kind, "args": vars(args), "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
