"""Run the benchmarks README.md's "Measured here" quotes and keep what each printed.

    python benchmarks/record.py                 # every entry of RUNS, one after another
    python benchmarks/record.py pruning load    # some of them

Each run's stdout and stderr go to benchmarks/results/NAME.txt under a header that says
what produced them: the command, the commit (and whether the tree had changes), the date,
the machine (CPUs, platform, jax backend) and its load average before and after, since on
a shared CPU the load moves the timings. A README figure cites the file it comes from.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> the script and flags README.md quotes (benchmarks/results/NAME.txt)
RUNS = {
    "compile": ["compile.py"],
    "variants": ["variants.py"],
    "metrics": ["metrics.py", "--batch", "4", "--one-core"],
    "pruning": [
        *("pruning.py", "--depth", "8", "--d-model", "256", "--batch", "2"),
        *("--seq-len", "512", "--repeat", "5", "--one-core"),
    ],
    "generate": [
        *("generate.py", "--model", "llama-small", "--batches", "1,8"),
        *("--prompt-len", "64", "--new-tokens", "16"),
    ],
    "mod": [
        *("mod.py", "--depth", "8", "--d-model", "128", "--batch", "4", "--seq-len", "256"),
        *("--capacities", "1,0.5,0.125"),
    ],
    "eval": ["eval.py", "--examples", "16", "--programs", "4", "--depth", "4", "--d-model", "64"],
    "search": ["search.py"],
    "gguf": ["gguf.py"],
    "long_context": ["long_context.py"],
    "load": ["load.py", "--repeat", "5"],
    "seeds": ["seeds.py"],
    "scale": ["scale.py"],
}


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip()


def header(command: list[str]) -> list[str]:
    """What produced a result file: command, commit, date, machine, load."""
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--", "depthjax") else ""
    return [
        f"# command: python benchmarks/{' '.join(command)}",
        f"# commit: {_git('rev-parse', '--short', 'HEAD')}{dirty}",
        f"# date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "# load average (1, 5, 15 min) before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
    ]


def record(name: str, out_dir: Path = HERE / "results") -> int:
    """Run RUNS[name] and write benchmarks/results/NAME.txt; returns its exit status."""
    command = RUNS[name]
    lines = header(command)
    print(f"[record] {name}: python benchmarks/{' '.join(command)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(HERE / command[0]), *command[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines += [
        "# load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"# wall time {time.time() - t0:.0f} s, exit status {proc.returncode}",
        "",
        proc.stdout.rstrip(),
    ]
    if proc.stderr.strip():
        lines += ["", "# stderr:", proc.stderr.rstrip()]
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    print(f"[record] {name}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
    return proc.returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("names", nargs="*", help=f"any of {', '.join(RUNS)} (default: all)")
    args = p.parse_args(argv)
    if unknown := sorted(set(args.names) - set(RUNS)):
        p.error(f"no benchmark run named {', '.join(unknown)}; known: {', '.join(RUNS)}")
    failed = [name for name in (args.names or RUNS) if record(name) != 0]
    if failed:
        print(f"[record] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
