"""Loading a Hugging Face checkpoint: `dj.hf.load` against transformers' `from_pretrained`.

    python benchmarks/load.py [--layers 6] [--repeat 3] [--dir DIR] [--keep]
                              [--memory-dir /dev/shm]

Writes a random Llama checkpoint in bfloat16 with transformers (TinyLlama's shapes: d_model
2048, 32 heads, 4 KV heads, d_ff 5632, vocab 32000; `--layers` of them; 6 layers is ~400M
parameters, ~0.8 GB) through the Python 3.11 reference environment (DEPTHJAX_REF_PYTHON,
default .venv-ref/bin/python), then loads it in fresh subprocesses, in turns:
transformers `from_pretrained(dtype=torch.bfloat16)`, `dj.hf.load(dir,
param_dtype="bfloat16")`, `dj.hf.load(dir)` (float32) and `dj.load` of the same weights
saved natively in bfloat16 (DIR-native, its digest checked as it reads). Each child reports
its load time (imports excluded), its resident memory after imports (the baseline), its
peak (VmHWM) after loading, and its peak after reading every weight once (transformers
maps the file and reads a page only when a weight is used, so its peak right after
loading does not yet hold the weights). The file is in the page cache for every load
(written just before). Prints min / max over repeats and the ratios to transformers.
Then saving: each library loads the checkpoint in bfloat16 and writes it back
(`save_pretrained`; `dj.hf.save`, and `dj.save` natively), timed with the peak resident
memory above what the loaded model already held. `dj.hf.save` and `dj.save` are
crash-safe (every file fsynced before an atomic swap) and `save_pretrained` is not (its
bytes may still sit in the page cache when it returns), so transformers is also timed with
an fsync of its files: the same durability. The saves run in rounds (every saver once, in
turns) into the temporary directory's disk, then into a tmpfs (--memory-dir): there the
fsync costs nothing and the times are what each library's CPU work costs. The disk's speed
drifts between rounds, so ratios are printed both for the fastest runs and as the median
of each round's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from common import (
    TINYLLAMA,
    ref_python,
    run_child,
    safetensors_bytes,
    with_rss_helpers,
    write_llama,
)

# every child prints one JSON line: seconds, baseline and peak resident KiB
_MEASURE = """
import json, time
{imports}
base = kib("VmRSS:")
t0 = time.perf_counter()
{load}
seconds = time.perf_counter() - t0
peak = kib("VmHWM:")
{touch}
print(json.dumps({{"seconds": seconds, "base": base, "peak": peak, "touched": kib("VmHWM:")}}))
"""

CHILDREN = {
    "transformers bf16": (
        "ref",
        "import torch, transformers as tf",
        "m = tf.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)",
        "[float(p.sum()) for p in m.parameters()]",
    ),
    "depthjax bf16": (
        "dj",
        "import jax, depthjax as dj",
        "m = dj.hf.load(DIR, param_dtype='bfloat16', progress=False); jax.block_until_ready(m)",
        "[float(p.sum()) for p in jax.tree.leaves(m.params)]",
    ),
    "depthjax f32": (
        "dj",
        "import jax, depthjax as dj",
        "m = dj.hf.load(DIR, progress=False); jax.block_until_ready(m)",
        "[float(p.sum()) for p in jax.tree.leaves(m.params)]",
    ),
    "dj.load native bf16": (  # the same weights as a native checkpoint (DIR-native)
        "dj",
        "import jax, depthjax as dj",
        "m = dj.load(DIR + '-native'); jax.block_until_ready(m)",
        "[float(p.sum()) for p in jax.tree.leaves(m.params)]",
    ),
}


# saving: load (untimed, every weight read), then time the save into a fresh directory
_SAVE = """
import json, os, tempfile, time
{imports}
{load}
{touch}
out = tempfile.mkdtemp(prefix="depthjax-save-", dir={where!r})
base = kib("VmRSS:")
reset_peak()
t0 = time.perf_counter()
{save}
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "over": kib("VmHWM:") - base}}))
import shutil; shutil.rmtree(out)
"""

_FSYNC = """
for name in os.listdir(out):  # what a crash-safe save adds: the bytes on disk
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
SAVES = {  # save -> (loader in CHILDREN, the code it times)
    "transformers": ("transformers bf16", "m.save_pretrained(out)"),
    "transformers + fsync": ("transformers bf16", "m.save_pretrained(out)" + _FSYNC),
    "depthjax": ("depthjax bf16", "dj.hf.save(m, out, overwrite=True, progress=False)"),
    "dj.save native": ("depthjax bf16", "dj.save(m, os.path.join(out, 'native'))"),
}


def measure(
    name: str, directory: str, template: str = _MEASURE, save: str = "", where: str = ""
) -> dict:
    env, imports, load, touch = CHILDREN[name]
    load = load.replace("DIR", repr(directory))
    fields = dict(imports=imports, load=load, touch=touch, save=save, where=where or None)
    code = with_rss_helpers(template.format(**fields))
    ref = env == "ref"
    return json.loads(run_child(ref_python() if ref else sys.executable, code, ref=ref))


def report_saves(directory: str, target: str, where: str, repeat: int) -> None:
    """Every save of SAVES into `where`, `repeat` rounds in turns; the disk's speed drifts
    between rounds (2-5x here), so each ratio is also taken within a round and its median
    over rounds printed beside the fastest runs' ratio."""
    saves = {name: [] for name in SAVES}
    for _ in range(repeat):
        for name, (loader, code) in SAVES.items():
            saves[name].append(measure(loader, directory, _SAVE, code, where))
    head = f"save (bfloat16) to {target}"
    print(f"\n{head:<26} {'save s':>12} {'median':>7} {'peak GiB over the model':>24}")
    for name, rs in saves.items():
        secs, over = [r["seconds"] for r in rs], [gib(r["over"]) for r in rs]
        print(
            f"{name:<26} {span(secs, '{:.2f}'.format):>12} {np.median(secs):>7.2f}"
            f" {span(over, '{:.2f}'.format):>24}"
        )
    for ours in ("depthjax", "dj.save native"):
        for ref in ("transformers", "transformers + fsync"):
            best = min(r["seconds"] for r in saves[ours]) / min(r["seconds"] for r in saves[ref])
            rounds = [a["seconds"] / b["seconds"] for a, b in zip(saves[ours], saves[ref])]
            print(
                f"{ours} / {ref}: save time {best:.2f}x (fastest runs), median of the rounds' "
                f"ratios {np.median(rounds):.2f}x (range {min(rounds):.2f}-{max(rounds):.2f})"
            )


def gib(kib: float) -> float:
    return kib / 2**20


def span(xs, f) -> str:
    return f"{f(min(xs))}" if len(xs) == 1 else f"{f(min(xs))}-{f(max(xs))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeat", type=int, default=1, help="loads per loader, taken in turns")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    p.add_argument(
        "--memory-dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else "",
        help="a tmpfs to time the saves without a disk too ('' to skip; default /dev/shm)",
    )
    args = p.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="depthjax-load-")
    if not os.path.exists(os.path.join(directory, "config.json")):
        n = write_llama(directory, args.layers, **TINYLLAMA)
        print(f"wrote {directory}: {n / 1e6:.0f}M parameters", flush=True)
    if not os.path.exists(directory + "-native"):  # the native checkpoint dj.load reads
        code = "import depthjax as dj, sys; d = sys.argv[1]\n"
        code += "dj.save(dj.hf.load(d, param_dtype='bfloat16', progress=False), d + '-native')"
        run_child(sys.executable, code + "\nprint('ok')", ref=False, args=[directory])
    nbytes = safetensors_bytes(directory)
    print(f"checkpoint: {nbytes / 2**30:.2f} GiB of safetensors (bfloat16)")
    runs: dict[str, list[dict]] = {name: [] for name in CHILDREN}
    for _ in range(args.repeat):
        for name in CHILDREN:
            runs[name].append(measure(name, directory))
    print(
        f"\n{'loader':<20} {'load s':>12} {'peak GiB':>12} {'+ read weights':>15}"
        f" {'over imports':>13}   ({args.repeat} run{'s' if args.repeat > 1 else ''}: min-max)"
    )
    best = {}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        peak = [gib(r["peak"]) for r in rs]
        touched = [gib(r["touched"]) for r in rs]
        over = [gib(r["touched"] - r["base"]) for r in rs]
        best[name] = (min(secs), min(touched), min(over))
        f2 = "{:.2f}".format
        print(
            f"{name:<20} {span(secs, f2):>12} {span(peak, f2):>12} {span(touched, f2):>15}"
            f" {span(over, f2):>13}"
        )
    tf_s, tf_peak, _ = best["transformers bf16"]
    for name in ("depthjax bf16", "depthjax f32", "dj.load native bf16"):
        s, peak, over = best[name]
        print(
            f"{name} / transformers: time {s / tf_s:.2f}x, peak RSS with the weights read "
            f"{peak / tf_peak:.2f}x; over imports {over / (nbytes / 2**30):.2f}x the "
            "checkpoint's bytes"
        )
    targets = {"disk": tempfile.gettempdir()}
    if args.memory_dir:
        targets["memory"] = args.memory_dir
    for target, where in targets.items():
        report_saves(directory, target, where, args.repeat)
    if not (args.keep or args.dir):
        shutil.rmtree(directory)
        shutil.rmtree(directory + "-native")


if __name__ == "__main__":
    main()
