"""Linearly expanded table leaves (TLEG): every row a fixed combination of two tensors.

`dj.depth.linear_expand(..., train=True)` replaces each leaf of `params["blocks"]` (a table
[n, *shape]) by the learngene it is made from:

    lx_a    dtype [*shape]   theta_A
    lx_b    dtype [*shape]   theta_B
    lx_pos  int32 [n]        l, the row's position
    lx_span int32 [n]        L - 1 (0 for a one-row table)

so that row l is theta_A + (l / (L - 1)) * theta_B, computed where the walker reads the row
(`depthjax.core.rows.take`): the constraint holds exactly at every training step and
gradients reach only the two tensors. The positions are integers, so training never moves
them (`depthjax.train.step.trainable_mask` skips integer leaves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

A, B, POS, SPAN = "lx_a", "lx_b", "lx_pos", "lx_span"


def is_leaf(node) -> bool:
    """Whether `node` is one linearly expanded leaf (the dict described above)."""
    return isinstance(node, dict) and A in node


def coefficient(pos, span):
    """l / (L - 1) as float32 (0 for a one-row table)."""
    return pos.astype(jnp.float32) / jnp.maximum(span, 1).astype(jnp.float32)


def expand_row(node: dict, r):
    """Row r (an int32 scalar, may be traced): theta_A + (l / (L - 1)) * theta_B."""
    row = lambda t: jax.lax.dynamic_index_in_dim(t, r, keepdims=False)
    c = coefficient(row(node[POS]), row(node[SPAN]))
    a = node[A]
    return (a.astype(jnp.float32) + c * node[B].astype(jnp.float32)).astype(a.dtype)


def check(node: dict) -> list[str]:
    """What is inconsistent in one leaf (empty when it is well formed)."""
    problems = []
    if node[A].shape != node[B].shape or node[A].dtype != node[B].dtype:
        problems.append(f"lx_a {node[A].shape} and lx_b {node[B].shape} differ")
    if node[POS].dtype != jnp.int32 or node[SPAN].dtype != jnp.int32:
        problems.append("lx_pos / lx_span must be int32")
    if node[POS].ndim != 1 or node[POS].shape != node[SPAN].shape:
        problems.append(f"lx_pos {node[POS].shape} / lx_span {node[SPAN].shape} must be [n]")
    return problems
