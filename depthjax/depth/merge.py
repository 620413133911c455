"""Weight-space operations across models that share a table layout: model soups
(averaging) and depth-scaled task vectors (LiNeS)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core import quant
from ..core.model import DepthModel
from ..core.program import ProgramError


def _check_same_table(models: Sequence[DepthModel], what: str) -> None:
    first = models[0]
    for m in models:
        quant.require_float(m.params["blocks"], what)
    ref = jax.tree.structure(first.params)
    for i, m in enumerate(models[1:], 1):
        if m.config != first.config:
            raise ValueError(f"{what}: model {i} has a different config than model 0")
        if jax.tree.structure(m.params) != ref:
            raise ValueError(f"{what}: model {i} has a different parameter tree than model 0")
        for (path, a), b in zip(jax.tree.leaves_with_path(first.params), jax.tree.leaves(m.params)):
            if a.shape != b.shape:
                raise ValueError(
                    f"{what}: parameter {jax.tree_util.keystr(path)} has shape "
                    f"{b.shape} in model {i} but {a.shape} in model 0"
                )
        if not all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(first.program), jax.tree.leaves(m.program))
        ):
            raise ProgramError(f"{what}: model {i} runs a different program than model 0")


def average(models: Sequence[DepthModel], weights: Sequence[float] | None = None) -> DepthModel:
    """Weighted mean of the parameters of models with the same config, table and program
    (a model soup). Weights default to uniform and are normalized to sum to 1."""
    if not models:
        raise ValueError("average: no models given")
    _check_same_table(models, "average")
    w = np.ones(len(models)) if weights is None else np.asarray(weights, float)
    if w.shape != (len(models),) or w.sum() <= 0:
        raise ValueError(f"average: need {len(models)} non-negative weights with a positive sum")
    w = w / w.sum()
    params = jax.tree.map(
        lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *[m.params for m in models]
    )
    return models[0].replace(params=params)


def lines(base: DepthModel, finetuned: DepthModel, alpha: float, beta: float) -> DepthModel:
    """LiNeS: base + lambda(l) * (finetuned - base), lambda(l) = alpha + beta * l / (L - 1)
    for the weights of step l (table rows and per-step parameters). Embeddings take
    lambda(0) and the head lambda(L - 1). Each table row must belong to one step
    (materialize tied models first)."""
    _check_same_table([base, finetuned], "lines")
    L = base.depth
    lam = alpha + beta * np.arange(L) / max(L - 1, 1)  # [depth]
    block = np.asarray(base.program.block)
    if len(np.unique(block)) != len(block):
        raise ProgramError(
            "lines: a table row is run by several steps, so its depth is "
            "ambiguous; materialize the model first"
        )
    row_lam = np.full(base.n_blocks, alpha)  # rows no step runs: lambda(0)
    row_lam[block] = lam

    def scaled(coef, b, f):
        shape = coef.shape + (1,) * (b.ndim - coef.ndim)
        return b + jnp.asarray(coef, b.dtype).reshape(shape) * (f - b)

    bp, fp = base.params, finetuned.params
    part = lambda name, lam_: jax.tree.map(lambda b, f: scaled(lam_, b, f), bp[name], fp[name])
    params = {
        "embed": part("embed", np.float32(lam[0])),
        "blocks": part("blocks", row_lam),
        "head": part("head", np.float32(lam[-1])),
    }
    if "steps" in bp:
        params["steps"] = jax.tree.map(lambda b, f: scaled(lam, b, f), bp["steps"], fp["steps"])
    return base.replace(params=params)
