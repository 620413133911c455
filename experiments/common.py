"""Shared pieces of the experiment scripts: flags, cached trained models (one or one per
seed), evaluation batches, the loss of any program, result files (JSON, Markdown table,
plots), and the statistics every figure is reported with (mean ± std and a 95% t-interval
over seeds; whether two settings separate).

Every script trains (or reuses) its models through `depthjax.train.run`; a model is cached
under --cache (default experiments/.cache, gitignored) keyed by its full TrainConfig, so
the scripts that share the base model train it once. `base_models` trains --seeds seeds
in one vmapped program (`seeds=N`) and caches each under the key of its own single-seed
run, so a seed trained either way is reused by both.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import depthjax as dj
from depthjax import metrics as M
from depthjax.files.corpus import sample_windows
from depthjax.metrics.intervals import fmt, separated, spread, t975  # noqa: F401 (re-exported)
from depthjax.pruning import report
from depthjax.train import TrainConfig, run as train_run
from depthjax.train.memory import DoesNotFit

HERE = Path(__file__).resolve().parent
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line with the seconds since the script started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def parser(name: str, doc: str, **defaults) -> argparse.ArgumentParser:
    """Flags every experiment shares; `defaults` overrides their default values.

    The default base model is an 8-step llama-style byte model (d_model 64) trained for
    600 steps on the embedded corpus: about 4 minutes on a 2-core CPU, then cached."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("base model (trained once, cached)")
    g.add_argument("--model", default="llama-tiny", help="preset name (depthjax presets)")
    g.add_argument("--layers", type=int, default=8, help="n_layers of the model")
    g.add_argument("--d-model", type=int, default=None, help="d_model (default: the preset's)")
    g.add_argument("--steps", type=int, default=600, help="training steps")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds --seed, --seed+1, ... that base_models trains (in one vmapped program)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval-batches",
        type=int,
        default=4,
        help="validation batches of [batch-size, seq-len] tokens for every loss",
    )
    g.add_argument(
        "--score-batches",
        type=int,
        default=2,
        help="separate validation batches the metrics score on",
    )
    g = p.add_argument_group("files")
    g.add_argument("--cache", default=str(HERE / ".cache"), help="trained-model cache dir")
    g.add_argument("--out", default=str(HERE / "results" / name), help="results dir")
    p.set_defaults(**defaults)
    return p


def model_overrides(args, **extra) -> dict:
    over = {"n_layers": args.layers, **extra}
    if args.d_model:
        over["d_model"] = args.d_model
    return over


def train_config(args, **changes) -> TrainConfig:
    """The TrainConfig of the base model from the flags, with `changes` applied."""
    base = dict(
        model=args.model,
        model_overrides=model_overrides(args),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        warmup_steps=min(50, max(args.steps // 10, 1)),
        log_every=max(args.steps // 10, 1),
        checkpoint_every=args.steps,
        keep_checkpoints=1,
        tensorboard=False,
    )
    return TrainConfig(**{**base, **changes})


def cached_run_dir(args, tag: str, tc: TrainConfig) -> Path:
    """The cache directory of the run `tc` (named by a hash of its whole config)."""
    config = tc.to_dict()
    if config["seeds"] == 1:  # the key of caches written before `seeds` existed
        del config["seeds"]
    key = json.dumps(config, sort_keys=True, default=str)
    return Path(args.cache) / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def trained(args, tag: str, tc: TrainConfig) -> dj.DepthModel:
    """Train with `tc` into the cache (or reuse an earlier identical run) and load it."""
    run_dir = cached_run_dir(args, tag, tc)
    if not (run_dir / "model").is_dir():
        log(
            f"training {tag}: {tc.steps} steps of {tc.batch_size}x{tc.seq_len} tokens "
            f"into {run_dir}"
        )
        train_run(run_dir, tc)
    else:
        log(f"reusing {tag} from {run_dir}")
    return dj.load(run_dir / "model")


def base_model(args) -> dj.DepthModel:
    return trained(args, "base", train_config(args))


def trained_seeds(args, tag: str, tc: TrainConfig, seeds) -> list[dj.DepthModel]:
    """The models of `tc` trained with each of `seeds`, in that order. Each is cached
    where `trained(args, tag, tc with seed=s)` caches it; the missing ones are trained
    together, each run of consecutive seeds in one vmapped program (`seeds=N`, equal to
    separate runs to float tolerance), or one run per seed where memory says the stack
    does not fit (memory.DoesNotFit)."""
    one = lambda s: dataclasses.replace(tc, seed=s, seeds=1)
    dirs = {s: cached_run_dir(args, tag, one(s)) for s in seeds}
    missing = [s for s in sorted(set(seeds)) if not (dirs[s] / "model").is_dir()]
    groups = [g for g in np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1) if len(g)]
    for group in groups:
        first, n = int(group[0]), len(group)
        if n == 1:
            trained(args, tag, one(first))
            continue
        stacked = dataclasses.replace(tc, seed=first, seeds=n)
        run_dir = cached_run_dir(args, f"{tag}-seeds", stacked)
        log(f"training {tag}: seeds {first}..{first + n - 1} in one program into {run_dir}")
        try:
            train_run(run_dir, stacked)
        except DoesNotFit as e:
            log(f"{e}: training the seeds one at a time")
            for s in range(first, first + n):
                trained(args, tag, one(s))
            continue
        for s in range(first, first + n):  # each seed's model where its own run keeps it
            dirs[s].mkdir(parents=True, exist_ok=True)
            tmp = dirs[s] / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(run_dir / "models" / f"seed-{s}", tmp)
            tmp.rename(dirs[s] / "model")
    if not missing:
        log(f"reusing {tag} seeds {list(seeds)} from {args.cache}")
    return [dj.load(dirs[s] / "model") for s in seeds]


def base_models(args) -> list[dj.DepthModel]:
    """The base model of every seed --seed .. --seed + --seeds - 1."""
    return trained_seeds(args, "base", train_config(args), range(args.seed, args.seed + args.seeds))


def batches(args, n: int, seed: int) -> list[np.ndarray]:
    """n fixed validation batches int32 [batch-size, seq-len] of the embedded corpus."""
    return [
        sample_windows(args.batch_size, args.seq_len, seed=seed + i, split="valid")
        for i in range(n)
    ]


def ordering_flags(p: argparse.ArgumentParser) -> None:
    """The flags of scripts that compare importance orderings with random controls."""
    p.add_argument("--shapley-permutations", type=int, default=24)
    p.add_argument("--random-orders", type=int, default=8)


def scored_base(args):
    """(results dir, base model, score batches, eval batches) of an ordering script."""
    return out_dir(args), base_model(args), score_batches(args), eval_batches(args)


def eval_batches(args):
    return batches(args, args.eval_batches, seed=1000)


def score_batches(args):
    """Disjoint from eval_batches' seeds, so rankings are not judged on their own data."""
    return batches(args, args.score_batches, seed=2000)


def loss(model: dj.DepthModel, data) -> float:
    """Mean next-token loss of `model` (any program) on `data`."""
    return M.loss(model, data)


def losses(model: dj.DepthModel, data, keep, unit: str = "block") -> np.ndarray:
    """Loss of every row of the keep masks [K, units] (1 = unit on), in one compiled call."""
    return M.coalition_measures(model, data, unit, np.asarray(keep))


def out_dir(args) -> Path:
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    return d


def md_table(headers, rows, floatfmt: str = ".4f") -> str:
    """A GitHub Markdown table; floats formatted with `floatfmt`."""
    cell = lambda v: f"{v:{floatfmt}}" if isinstance(v, (float, np.floating)) else str(v)
    lines = [
        "| " + " | ".join(map(str, headers)) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse(p: argparse.ArgumentParser, argv, script: str) -> argparse.Namespace:
    """Parse argv (None: the command line) and record the command that reproduces it."""
    args = p.parse_args(argv)
    path = Path(script).resolve()
    path = path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path
    args.command = " ".join(["python", path.as_posix(), *(sys.argv[1:] if argv is None else argv)])
    return args


def write_results(args, out: Path, title: str, sections: list[str], data: dict) -> None:
    """results.md (title, the command, sections) and results.json (data + the command)."""
    text = f"# {title}\n\nCommand: `{args.command}`\n\n" + "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(text)
    report.write_json({**data, "command": args.command}, out / "results.json")
    print("\n" + text, flush=True)
    log(f"wrote {out}/results.md, results.json")


def fitted(args, tag: str, settings: dict, train_fn) -> dj.DepthModel:
    """A model trained by `train_fn()` (e.g. with depthjax.adaptive.fit), cached under
    --cache by a hash of `settings` (everything that determines the result); the history
    of the run is kept beside it as history.json."""
    key = json.dumps(settings, sort_keys=True, default=str)
    run_dir = Path(args.cache) / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if not (run_dir / "model").is_dir():
        log(f"training {tag} into {run_dir}")
        model, history = train_fn()
        dj.save(model, run_dir / "model")
        report.write_json({"settings": settings, "history": history}, run_dir / "history.json")
    else:
        log(f"reusing {tag} from {run_dir}")
    return dj.load(run_dir / "model")


def train_batches(args, seed: int = 0):
    """batch_fn for depthjax.adaptive.fit: step -> (int32 [batch-size, seq-len],) of the
    training split, a fixed sequence for a given seed."""
    return lambda step: (
        sample_windows(args.batch_size, args.seq_len, seed=seed * 1_000_003 + step),
    )


# -- figures over seeds (spread, fmt, separated: depthjax.metrics.intervals) --------------
NOT_RESOLVED = "not resolved at this scale"


def seed_list(args) -> list[int]:
    """The seeds of base_models(args), in its order."""
    return list(range(args.seed, args.seed + args.seeds))


def mean_bands(curves: dict) -> tuple[dict, dict]:
    """(mean curve, (mean - std, mean + std) band) of each [seeds, K] array in `curves`,
    for report.plot_curves; one seed gives a zero-width band."""
    means, bands = {}, {}
    for name, v in curves.items():
        v = np.asarray(v, np.float64)
        std = v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:])
        means[name], bands[name] = v.mean(0), (v.mean(0) - std, v.mean(0) + std)
    return means, bands


def resolved(a, b) -> tuple[np.ndarray, bool]:
    """(a - b per seed, whether its 95% interval excludes 0): False for one seed."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return d, bool(d.size > 1 and separated(a, b))


def compare(a, b, name_a: str, name_b: str, digits: int = 4, what: str = "loss") -> str:
    """One line: the per-seed difference a - b (paired by seed) with its spread,
    and what its 95% interval supports: which setting has the lower `what`, or "not
    resolved at this scale" (always, for one seed)."""
    d, ok = resolved(a, b)
    verdict = f"{name_a if d.mean() < 0 else name_b} has the lower {what}"
    return f"{name_a} minus {name_b}: {fmt(d, digits)}; {verdict if ok else NOT_RESOLVED}."


def compared(label: str, a, b, digits: int = 4) -> str:
    """A Markdown list line for two settings' figures (one value per seed each, paired by
    seed): the per-seed differences a - b as `fmt` shows them, and "separated" where
    the 95% interval excludes 0, else "not resolved at this scale" (also for one seed)."""
    d, ok = resolved(a, b)
    return f"- {label}: {fmt(d, digits)}; {'separated' if ok else NOT_RESOLVED}."
