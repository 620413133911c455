"""Quantized block tables: how they are stored, and how one row is read back.

`dj.depth.quantize` replaces each kernel leaf of `params["blocks"]` (a table [n, *in, *out])
by a dict holding the table in integers with per-row bit widths:

    qint   int8  [n, *in, *out]   symmetric integers, |q| <= 2**(bits-1) - 1 (0 in 16-bit rows)
    qscale dtype [n, G, *out]     one scale per group of g consecutive inputs (in = G * g);
                                  its dtype is the kernel's, which dequantization returns
    qbits  int8  [n]              the row's bit width: 4, 8 or 16
    qfull  dtype [m, *in, *out]   only if m >= 1 rows are at 16 bits: those rows, untouched
    qslot  int32 [n]              (with qfull) the row's index in qfull, -1 when quantized

Why this layout: every row of every width lives in one stacked table, so the scan gathers
row `block[i]` and runs one compiled step for all rows whatever their width (a table per
width would need a branch or a compile per width). 4- and 8-bit rows share int8 storage (a
4-bit row wastes half its byte; `table_bytes(packed=True)` reports what nibble packing would
take). A 16-bit row is "not quantized": it must run bit-identical to the original, which no
16-bit integer (or float16 copy of a float32 row) can promise, so those rows sit in a side
table `qfull` of the kernel's own dtype, holding only them (m rows, not n). That side table
is the one leaf without the table's leading [n] axis: rows are read through
`depthjax.core.rows.take`, never by indexing leaves directly, and `rows.count` counts them.

Norm scales and biases stay in floats; embeddings and the head are not in the table.
`dequantize_row` is called only by `rows.take`, the one row reader: every path that walks a
program (dj.apply, traces, decoding, dj.specialize) gathers its rows through it, inside the
step, so the float table never exists in memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..errors import DepthjaxError

QINT, QSCALE, QBITS, QFULL, QSLOT = "qint", "qscale", "qbits", "qfull", "qslot"


class QuantizedError(DepthjaxError):
    """A quantized block table where a float one is needed (or a malformed one)."""


def is_leaf(node) -> bool:
    """Whether `node` is one quantized kernel (the dict described above)."""
    return isinstance(node, dict) and QINT in node


def is_quantized(blocks) -> bool:
    """Whether any leaf of a block table is quantized."""
    if is_leaf(blocks):
        return True
    return isinstance(blocks, dict) and any(is_quantized(v) for v in blocks.values())


def table_leaves(node: dict) -> list:
    """The leaves of one quantized kernel that carry the table's leading [n] axis."""
    return [node[QINT], node[QSCALE], node[QBITS]]


def dequantize_row(node: dict, r):
    """One row (r: an int32 scalar, may be traced) of a quantized kernel, in its dtype."""
    row = lambda t, i: jax.lax.dynamic_index_in_dim(t, i, keepdims=False)
    q, s = row(node[QINT], r), row(node[QSCALE], r)  # [*in, *out], [G, *out]
    w = q.reshape((s.shape[0], -1) + s.shape[1:]).astype(jnp.float32)
    w = (w * s.astype(jnp.float32)[:, None]).reshape(q.shape).astype(s.dtype)
    if QFULL in node:
        slot = row(node[QSLOT], r)
        w = jnp.where(slot >= 0, row(node[QFULL], jnp.maximum(slot, 0)), w)
    return w


def select(node: dict, idx) -> dict:
    """One quantized kernel restricted (or repeated) to rows `idx` (int array)."""
    out = {k: node[k][idx] for k in (QINT, QSCALE, QBITS)}
    if QFULL in node:
        out.update({QFULL: node[QFULL], QSLOT: node[QSLOT][idx]})
    return out


def require_float(blocks, what: str) -> None:
    """Raise QuantizedError naming `what` when the table is quantized."""
    if is_quantized(blocks):
        raise QuantizedError(
            f"{what} needs a float block table, but this model is quantized "
            "(dj.depth.quantize); dequantize it first with dj.depth.dequantize(model)"
        )


def check(x: dict) -> list[str]:
    """What is inconsistent in one quantized kernel (dtypes, shapes, bit widths, slots);
    empty when it is well formed."""
    q, s, b = x[QINT], x[QSCALE], x[QBITS]
    n, out = q.shape[0], s.shape[2:]
    bits = jax.device_get(b)
    problems = []
    if q.dtype != jnp.int8 or b.dtype != jnp.int8:
        problems.append(f"qint/qbits must be int8, got {q.dtype}/{b.dtype}")
    n_in = q[0].size // max(1, math.prod(out))
    if (
        b.shape != (n,)
        or s.ndim < 2
        or s.shape[0] != n
        or q.shape[q.ndim - len(out) :] != out
        or not s.shape[1]
        or n_in % s.shape[1]
    ):
        problems.append(f"shapes qint {q.shape}, qscale {s.shape}, qbits {b.shape} disagree")
    if not set(bits.tolist()) <= {4, 8, 16}:
        problems.append(f"bit widths {sorted(set(bits.tolist()))} (4, 8 or 16)")
    has_full = bool((bits == 16).any())
    if has_full != (QFULL in x) or (QFULL in x) != (QSLOT in x):
        problems.append("qfull/qslot must be present exactly when a row is at 16 bits")
    elif has_full:
        slot = jax.device_get(x[QSLOT])
        if x[QFULL].shape[1:] != q.shape[1:] or slot.shape != (n,):
            problems.append(f"qfull {x[QFULL].shape} / qslot {slot.shape} do not fit {q.shape}")
        elif ((slot >= 0) != (bits == 16)).any() or slot.max() >= x[QFULL].shape[0]:
            problems.append("qslot must index qfull exactly in the 16-bit rows")
    return problems


def row_bits(blocks):
    """Bit width of each row (int8 [n]), or None for a table with no quantized leaf."""
    if is_leaf(blocks):
        return blocks[QBITS]
    for v in blocks.values() if isinstance(blocks, dict) else ():
        found = row_bits(v)
        if found is not None:
            return found
    return None
