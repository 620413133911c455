"""Seeds as an axis: N seeds of the experiments' base model trained in one vmapped program
(`depthjax train seeds=N`) against N sequential single-seed runs, in the same process.

    python benchmarks/seeds.py [--seeds 3] [--steps 60] [--repeats 1] [any train key=value]

Both sides are the whole `depthjax.train.run`: compile, data, checkpoints, the final
model(s). Per repeat it prints the wall time and this process's CPU time of each side and
their ratio (sequential / vmapped: above 1, the vmapped program is faster), and the
steady-state step time (median `step_time_s` of metrics.jsonl after the first step, which
includes the compile). With --repeats > 1 the summary gives each ratio's median and range.
A separate process per seed would also pay its start-up (imports, ~5-10 s here), which
this in-process comparison leaves out: the ratio it prints is the smaller one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from depthjax.train import parse, run

BASE = [  # experiments/common.py's base model and batch
    "model=llama-tiny",
    "model.n_layers=8",
    "model.d_model=64",
    "batch_size=16",
    "seq_len=128",
    "lr=3e-3",
    "tensorboard=false",
    "keep_checkpoints=1",
]


def timed_run(out: Path, keys: list[str]) -> dict:
    """Wall and CPU seconds of one `run`, and its median step time after step 1."""
    tc = parse(keys)
    wall, cpu = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as quiet:
        run(out, tc, stream=quiet)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = [json.loads(line)["step_time_s"] for line in (out / "metrics.jsonl").open()]
    return {"wall": wall, "cpu": cpu, "step": statistics.median(steps[1:])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("keys", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    keys = [*BASE, f"steps={args.steps}", f"checkpoint_every={args.steps}", *args.keys]
    print(f"{args.seeds} seeds, {args.steps} steps of {' '.join(keys)}")
    ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            stacked = timed_run(Path(tmp, f"{r}-stacked"), [*keys, f"seeds={args.seeds}"])
            alone = [
                timed_run(Path(tmp, f"{r}-seed{s}"), [*keys, f"seed={s}"])
                for s in range(args.seeds)
            ]
            sequential = {k: sum(a[k] for a in alone) for k in ("wall", "cpu", "step")}
            for k in ratios:
                ratios[k].append(sequential[k] / stacked[k])
            print(
                f"repeat {r}: vmapped {stacked['wall']:.1f} s wall, {stacked['cpu']:.1f} s CPU, "
                f"{1e3 * stacked['step']:.1f} ms/step | sequential {sequential['wall']:.1f} s "
                f"wall, {sequential['cpu']:.1f} s CPU, {1e3 * sequential['step']:.1f} ms/step "
                f"(summed over seeds) | ratio wall {ratios['wall'][-1]:.2f}, CPU "
                f"{ratios['cpu'][-1]:.2f}, step {ratios['step'][-1]:.2f}",
                flush=True,
            )
    for k, v in ratios.items():
        spread = f" (range {min(v):.2f}-{max(v):.2f}, n={len(v)})" if len(v) > 1 else " (one run)"
        print(f"sequential / vmapped, {k}: {statistics.median(v):.2f}{spread}")


if __name__ == "__main__":
    main()
