"""TLEG: a transformer as the linear expansion of a learngene.

Layer l of L has parameters theta_l = theta_A + (l / (L - 1)) * theta_B, for every leaf of
the block table (kernels, norms, biases); theta_A and theta_B are the *learngene*.

    aux = dj.depth.linear_expand(seed, 12, train=True)   # table parameterized by the learngene
    ... train aux (dj.adaptive fit, or any loop over aux.params) ...
    gene = dj.depth.learngene(aux)                       # 2 rows: [theta_A, theta_B]
    small = dj.depth.linear_expand(gene, 4)              # any depth, a plain table to fine-tune

A learngene is a model whose table has two rows, row 0 = theta_A and row 1 = theta_B, or a
linearly expanded model (train=True), whose theta_A and theta_B are used. With train=True
the table's leaves are stored as the learngene itself plus each row's position
(depthjax.core.linear), and each row is computed where the walker reads it: the constraint
holds exactly through training, and gradients reach only theta_A and theta_B. With
train=False the rows are computed once into a plain table (the same arithmetic, so both
modes give the same numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..core import linear, rows as rows_lib
from ..core.model import DepthModel
from ..core.program import Program
from ..errors import DepthjaxError
from .table import with_table


class LearngeneError(DepthjaxError):
    """A model that is not a learngene, or a depth a learngene cannot expand to."""


def _genes(model: DepthModel):
    """(theta_A, theta_B) trees of one row each."""
    blocks = model.params["blocks"]
    stored = rows_lib.map_leaves(linear.is_leaf, blocks)
    if all(jax.tree.leaves(stored)):
        pick = lambda key: rows_lib.map_leaves(lambda x: x[key], blocks)
        return pick(linear.A), pick(linear.B)
    if any(jax.tree.leaves(stored)) or model.n_blocks != 2:
        raise LearngeneError(
            f"a learngene is a 2-row table [theta_A, theta_B] or a linearly expanded model; "
            f"this table has {model.n_blocks} rows"
            + ("" if model.n_blocks == 2 else " (dj.depth.learngene(model) fits one to them)")
        )
    floats = rows_lib.floats(blocks)
    return rows_lib.take(floats, 0), rows_lib.take(floats, 1)


def _check(model: DepthModel, what: str) -> None:
    if model.params.get("steps"):
        raise LearngeneError(
            f"{what}: the model has per-step parameters (params['steps']), which belong to "
            "its program, not to its table; fold or drop them first"
        )
    cfg = model.config
    if cfg.layer_types is not None and len(set(cfg.layer_types)) > 1:
        raise LearngeneError(
            f"{what}: the table's rows have different attention kinds "
            f"(layer_types={cfg.layer_types!r}); a learngene needs one kind for every row"
        )


def linear_expand(learngene: DepthModel, depth: int, *, train: bool = False) -> DepthModel:
    """A model of `depth` steps whose row l is theta_A + (l / (depth - 1)) * theta_B (row 0:
    theta_A for depth 1), run by a sequential program; embeddings and head are the
    learngene model's. train=True keeps the table parameterized by the learngene (see the
    module docstring); train=False returns a plain table."""
    if not isinstance(depth, (int, np.integer)) or depth < 1:
        raise LearngeneError(f"depth must be a positive int, got {depth!r}")
    _check(learngene, "linear_expand")
    a, b = _genes(learngene)
    n = int(depth)
    pos = jnp.arange(n, dtype=jnp.int32)
    span = jnp.full((n,), n - 1, jnp.int32)
    blocks = jax.tree.map(
        lambda x, y: {linear.A: x, linear.B: y, linear.POS: pos, linear.SPAN: span}, a, b
    )
    if not train:
        blocks = rows_lib.floats(blocks)
    return with_table(learngene, blocks, Program.sequential(n), rows=np.zeros(n, np.int32))


def learngene(model: DepthModel) -> DepthModel:
    """The learngene of a model as a 2-row table [theta_A, theta_B]: exact for a linearly
    expanded model; otherwise the least-squares line through its table rows, row r at
    position r / (n - 1) (for 2 rows: theta_A = row 0, theta_B = row 1 - row 0)."""
    _check(model, "learngene")
    blocks = model.params["blocks"]
    if any(jax.tree.leaves(rows_lib.map_leaves(linear.is_leaf, blocks))):
        a, b = _genes(model)
    else:
        n = model.n_blocks
        if n < 2:
            raise LearngeneError("fitting a learngene needs a table of at least 2 rows")
        t = jnp.arange(n, dtype=jnp.float32) / (n - 1)
        tc = t - t.mean()

        def fit(table):
            x = table.astype(jnp.float32)
            mean = x.mean(0)
            slope = jnp.tensordot(tc, x - mean, axes=1) / jnp.sum(tc * tc)
            return (mean - t.mean() * slope).astype(table.dtype), slope.astype(table.dtype)

        pairs = jax.tree.map(fit, rows_lib.floats(blocks))
        is_pair = lambda x: isinstance(x, tuple)
        a = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
        b = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    table = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    steps = {k: v for k, v in model.params.items() if k != "steps"}
    plain = model.replace(params=steps)
    return with_table(plain, table, Program.sequential(2), rows=np.zeros(2, np.int32))


def is_expanded(model: DepthModel) -> bool:
    """Whether the model's table is parameterized by a learngene (train=True)."""
    return any(jax.tree.leaves(rows_lib.map_leaves(linear.is_leaf, model.params["blocks"])))
