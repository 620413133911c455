"""Score a model with every metric, draw removal curves, and write tables, JSON and plots.

Shared by `depthjax score`, `depthjax prune` and `depthjax demo`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .. import metrics as M, progress
from ..core.model import DepthModel
from ..metrics.scores import Scores


def _log(msg: str) -> None:
    print(f"[score] {msg}", flush=True)


def default_measure(model: DepthModel, batches, mode: str = "mean", normalize: bool = False):
    """What coalition metrics measure when no task is given: the next-token loss of a causal
    model; for an encoder, 1 - the cosine of its pooled embeddings to the full model's."""
    if model.config.causal:
        return "loss"
    from ..eval import Representation

    return Representation(batches, mode, normalize)


def measure_label(measure) -> str:
    """How a measure reads on a plot axis (lower is better for all of them)."""
    if isinstance(measure, str):
        return {
            "loss": "validation loss",
            "logit": "logit distance",
            "hidden": "hidden-state distance",
        }.get(measure, measure)
    kind = type(measure).__name__
    return {
        "MultipleChoice": f"1 - {getattr(measure, 'metric', 'acc')} ({measure.name})",
        "ExactMatch": f"1 - exact match ({measure.name})",
        "Perplexity": f"nats/token ({measure.name})",
        "Representation": "1 - cosine to the full model",
    }.get(kind, measure.name)


def score_all(
    model: DepthModel,
    batches,
    *,
    shapley_permutations: int | None = None,
    key=None,
    log=_log,
    measure=None,
) -> dict[str, Scores]:
    """Every metric on the same data: trace metrics (one pass over `batches`), leave-one-out
    ablation of blocks, attention and MLP and Shapley values of blocks (see
    `shapley_permutations_for`; 0 skips them) by `measure` (default: see `default_measure`;
    a depthjax.eval task brings its own data), and the logit lens (causal models). `log`
    receives one timing line per metric."""
    measure = default_measure(model, batches) if measure is None else measure
    stages = [("trace metrics", lambda: M.trace_metrics(model, batches))]
    stages += [
        (
            f"ablation ({unit})",
            lambda unit=unit: {
                f"ablation_{unit}": M.ablation(model, batches, unit=unit, measure=measure)
            },
        )
        for unit in ("block", "attn", "mlp")
    ]
    if shapley_permutations != 0:
        perms = shapley_permutations_for(model, "block", shapley_permutations)
        how = f"{perms} permutations" if perms else f"exact, {1 << model.depth} coalitions"
        stages.append(
            (
                f"shapley ({how})",
                lambda: {
                    "shapley_block": M.shapley(
                        model, batches, num_permutations=perms, key=key, measure=measure
                    )
                },
            )
        )
    if model.config.causal:
        stages.append(("logit lens", lambda: {"logit_lens": M.logit_lens(model, batches)}))
    out = {}
    with progress.bar("scoring", total=len(stages)) as bar:
        for name, fn in stages:
            t0 = time.perf_counter()
            out.update(fn())
            log(f"{name:<28} {time.perf_counter() - t0:6.2f}s")
            bar.advance()
    return out


def shapley_permutations_for(
    model: DepthModel, unit: str, permutations: int | None, max_coalitions: int = 4096
) -> int | None:
    """None (exact Shapley values) when `permutations` is None and the 2**n coalitions of
    the n units fit max_coalitions; else `permutations` (16 antithetic ones if None)."""
    n = M.coalitions.n_units(model, unit)
    if permutations is None:
        return None if (1 << n) <= max_coalitions else 16
    return permutations


def importance(scores: dict[str, Scores], unit: str) -> dict[str, Scores]:
    """The scores that rank units of kind `unit` (higher = more important)."""
    return {k: s for k, s in scores.items() if s.unit == unit and k != "logit_lens"}


def removal_curves(
    model: DepthModel,
    batches,
    scores: dict[str, Scores],
    unit: str = "block",
    max_units: int | None = None,
    measure=None,
) -> dict[str, np.ndarray]:
    """The measure (default: see `default_measure`) after removing k = 0..max_units units
    in each metric's order."""
    measure = default_measure(model, batches) if measure is None else measure
    ranked = importance(scores, unit)
    return {
        name: M.removal_curve(
            model, batches, ranked[name], max_units=max_units, unit=unit, measure=measure
        )
        for name in progress.track(list(ranked), "removal curves")
    }


def table(scores: dict[str, Scores], unit: str = "block") -> str:
    """Per-step table of the metrics ranking `unit` (plus residual norm)."""
    cols = importance(scores, unit)
    norm = next(
        (s.extra["residual_norm"] for s in scores.values() if "residual_norm" in s.extra), None
    )
    names = list(cols)
    head = f"{'step':>4} " + " ".join(f"{n[:14]:>14}" for n in names)
    head += f" {'|resid in|':>10}" if norm is not None else ""
    rows = [head]
    for i in range(len(next(iter(cols.values())))):
        row = f"{i:>4} " + " ".join(f"{cols[n].values[i]:>14.5f}" for n in names)
        rows.append(row + (f" {norm[i]:>10.3f}" if norm is not None else ""))
    return "\n".join(rows)


def to_json(obj):
    if isinstance(obj, Scores):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(obj, path) -> None:
    Path(path).write_text(json.dumps(to_json(obj), indent=1))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profiles(scores, path, title: str = "") -> None:
    """One panel per metric across depth; cosine metrics carry the residual norm.
    `scores`: {name: Scores}, or a list of them (one per seed) drawn as one line each."""
    runs = scores if isinstance(scores, list) else [scores]
    plt = pyplot()
    names = list(runs[0])
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        twin = ax.twinx() if "residual_norm" in runs[0][name].extra else None
        for i, run in enumerate(runs):
            s = run[name]
            ax.plot(np.arange(len(s.values)), s.values, "o-", ms=3, color=f"C{i}")
            if twin is not None:
                norm = np.asarray(s.extra["residual_norm"])
                twin.plot(np.arange(len(norm)), norm, ":", color=f"C{i}", lw=1, alpha=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step" if runs[0][name].unit != "span" else "depth index")
        if twin is not None:
            twin.set_ylabel("|residual|", fontsize=7, color="gray")
            twin.tick_params(labelsize=6, colors="gray")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(
    curves: dict[str, np.ndarray],
    path,
    *,
    xlabel: str,
    ylabel: str = "loss",
    title: str = "",
    baseline: float | None = None,
    bands: dict[str, tuple] | None = None,
) -> None:
    """One line per curve; bands[name] = (low, high) shades a spread around that curve."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        (line,) = ax.plot(np.arange(len(ys)), ys, "o-", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(np.arange(len(ys)), lo, hi, color=line.get_color(), alpha=0.15)
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls=":", lw=1, label="full model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
