"""Reading rows of the block table: the one place a row is gathered.

Most leaves of `params["blocks"]` are plain tables [n, ...]. Two transforms store a leaf in
another form, a dict standing for the same [n, ...] table:

* quantized kernels (`dj.depth.quantize`; depthjax.core.quant): integers, scales, bit widths;
* linearly expanded leaves (`dj.depth.linear_expand(train=True)`; depthjax.core.linear):
  two tensors theta_A, theta_B and each row's position, row l = theta_A + l/(L-1) theta_B.

`take(blocks, r)` returns row r as floats whatever the form: every path that walks a
program (dj.apply, traces, decoding, dj.specialize, the metrics) gathers rows through it,
inside the step, so a quantized table is dequantized one row at a time and an expanded
table is never materialized (its gradients reach theta_A and theta_B). Code that needs a
whole float table calls `floats`; `count` and `leading` stand in for "the first leaf's
leading axis", which a stored leaf's side tables do not have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import linear, quant


def is_stored(node) -> bool:
    """Whether `node` is one leaf stored in another form (quantized or expanded)."""
    return quant.is_leaf(node) or linear.is_leaf(node)


def map_leaves(fn, blocks):
    """fn(leaf) over a block table, a stored leaf's dict counting as one leaf."""
    if is_stored(blocks) or not isinstance(blocks, dict):
        return fn(blocks)
    return {k: map_leaves(fn, v) for k, v in blocks.items()}


def leading(blocks) -> list:
    """The arrays that carry the table's leading [n] axis."""
    out = []

    def one(x):
        if quant.is_leaf(x):
            out.extend(quant.table_leaves(x))
        elif linear.is_leaf(x):
            out.extend([x[linear.POS], x[linear.SPAN]])
        else:
            out.append(x)

    map_leaves(one, blocks)
    return out


def count(blocks) -> int:
    """Rows of a block table, whatever the form of its leaves."""
    return leading(blocks)[0].shape[0]


def _row(x, r):
    if quant.is_leaf(x):
        return quant.dequantize_row(x, r)
    if linear.is_leaf(x):
        return linear.expand_row(x, r)
    return jax.lax.dynamic_index_in_dim(x, r, keepdims=False)  # no copy inside a scan


def take(blocks, r):
    """Row r of the table as floats (r: an int scalar, may be traced; or an int array [k]
    for k rows, stacked)."""
    r = jnp.asarray(r)
    if r.ndim:
        return jax.vmap(lambda i: take(blocks, i))(r)
    return map_leaves(lambda x: _row(x, r), blocks)


def select(blocks, idx):
    """The table restricted (or repeated) to rows `idx` (int array), leaves kept in their
    form (a quantized table stays quantized)."""

    def one(x):
        if quant.is_leaf(x):
            return quant.select(x, idx)
        if linear.is_leaf(x):
            return {**x, linear.POS: x[linear.POS][idx], linear.SPAN: x[linear.SPAN][idx]}
        return x[idx]

    return map_leaves(one, blocks)


def is_plain(blocks) -> bool:
    """Whether every leaf is a plain [n, ...] table."""
    return not any(jax.tree.leaves(map_leaves(is_stored, blocks)))


def floats(blocks):
    """The plain float table [n, ...] of any table (itself when already plain)."""
    if is_plain(blocks):
        return blocks
    return take(blocks, jnp.arange(count(blocks), dtype=jnp.int32))


def logical(blocks):
    """Each stored leaf replaced by a jax.ShapeDtypeStruct of the float table it stands
    for (shape checks against the config)."""

    def one(x):
        if quant.is_leaf(x):
            return jax.ShapeDtypeStruct(x[quant.QINT].shape, x[quant.QSCALE].dtype)
        if linear.is_leaf(x):
            return jax.ShapeDtypeStruct(x[linear.POS].shape + x[linear.A].shape, x[linear.A].dtype)
        return x

    return map_leaves(one, blocks)


def problems(blocks) -> list[str]:
    """What is inconsistent in the stored leaves (empty when all are well formed)."""
    out = []

    def one(x):
        if quant.is_leaf(x):
            out.extend(quant.check(x))
        elif linear.is_leaf(x):
            out.extend(linear.check(x))

    map_leaves(one, blocks)
    return out
