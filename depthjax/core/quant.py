"""Quantized block tables: how they are stored, and the one place a row is read back.

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
is the one leaf without the table's leading [n] axis: rows are read through `take`, never
by indexing leaves directly, and `rows` counts the table.

Norm scales and biases stay in floats; embeddings and the head are not in the table.
`take(blocks, r)` is the only place a quantized row is dequantized: every path that walks a
program (dj.apply, traces, decoding, dj.specialize) gathers its rows through it, inside the
step, so the float table never exists in memory.
"""

from __future__ import annotations

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


def map_leaves(fn, blocks):
    """fn(leaf) over a block table, a quantized kernel's dict counting as one leaf."""
    if is_leaf(blocks) or not isinstance(blocks, dict):
        return fn(blocks)
    return {k: map_leaves(fn, v) for k, v in blocks.items()}


def table_leaves(blocks) -> list:
    """The leaves that carry the table's leading [n] axis (qfull excluded)."""
    out = []
    map_leaves(lambda x: out.extend([x[QINT], x[QSCALE], x[QBITS]] if is_leaf(x) else [x]), blocks)
    return out


def rows(blocks) -> int:
    """Rows of a block table, quantized or not."""
    return table_leaves(blocks)[0].shape[0]


def dequantize_row(node: dict, r):
    """One row (r: an int32 scalar, may be traced) of a quantized kernel, in its dtype."""
    q, s = _row(node[QINT], r), _row(node[QSCALE], r)  # [*in, *out], [G, *out]
    w = q.reshape((s.shape[0], -1) + s.shape[1:]).astype(jnp.float32)
    w = (w * s.astype(jnp.float32)[:, None]).reshape(q.shape).astype(s.dtype)
    if QFULL in node:
        slot = _row(node[QSLOT], r)
        w = jnp.where(slot >= 0, _row(node[QFULL], jnp.maximum(slot, 0)), w)
    return w


def take(blocks, r):
    """Row r of the table (an int scalar, may be traced; or an int array [k] for k rows,
    stacked), every quantized kernel dequantized."""
    r = jnp.asarray(r)
    if r.ndim:
        return jax.vmap(lambda i: take(blocks, i))(r)
    return map_leaves(lambda x: dequantize_row(x, r) if is_leaf(x) else _row(x, r), blocks)


def _row(table, r):
    """table[r] as a dynamic slice (no copy of the table inside a scan)."""
    return jax.lax.dynamic_index_in_dim(table, r, keepdims=False)


def select(blocks, idx):
    """The table restricted (or repeated) to rows `idx` (int array), still quantized."""

    def one(x):
        if not is_leaf(x):
            return x[idx]
        out = {k: x[k][idx] for k in (QINT, QSCALE, QBITS)}
        if QFULL in x:
            out.update({QFULL: x[QFULL], QSLOT: x[QSLOT][idx]})
        return out

    return map_leaves(one, blocks)


def dequantize(blocks):
    """The float table of a (possibly) quantized one: every row through `take`."""
    if not is_quantized(blocks):
        return blocks
    return take(blocks, jnp.arange(rows(blocks), dtype=jnp.int32))


def logical(blocks):
    """The table as the config sees it: each quantized kernel replaced by a
    jax.ShapeDtypeStruct of its float table (shape checks, FLOP counts)."""
    return map_leaves(
        lambda x: jax.ShapeDtypeStruct(x[QINT].shape, x[QSCALE].dtype) if is_leaf(x) else x,
        blocks,
    )


def require_float(blocks, what: str) -> None:
    """Raise QuantizedError naming `what` when the table is quantized."""
    if is_quantized(blocks):
        raise QuantizedError(
            f"{what} needs a float block table, but this model is quantized "
            "(dj.depth.quantize); dequantize it first with dj.depth.dequantize(model)"
        )


def check(blocks) -> None:
    """Raise QuantizedError unless every quantized kernel is consistent (dtypes, shapes,
    bit widths, slots): what a checkpoint must hold to load as a quantized table."""

    def one(x):
        if not is_leaf(x):
            return x
        q, s, b = x[QINT], x[QSCALE], x[QBITS]
        n = q.shape[0]
        bits = jax.device_get(b)
        problems = []
        if q.dtype != jnp.int8 or b.dtype != jnp.int8:
            problems.append(f"qint/qbits must be int8, got {q.dtype}/{b.dtype}")
        if (
            b.shape != (n,)
            or s.shape[0] != n
            or s.ndim < 2
            or s.shape[2:] != q.shape[-s.ndim + 2 :]
        ):
            problems.append(f"shapes qint {q.shape}, qscale {s.shape}, qbits {b.shape} disagree")
        elif (q[0].size // max(1, s[0].size)) * s[0].size != q[0].size:
            problems.append(f"qscale {s.shape} does not group qint {q.shape}")
        if not set(bits.tolist()) <= {4, 8, 16}:
            problems.append(f"bit widths {sorted(set(bits.tolist()))} (4, 8 or 16)")
        has_full = (bits == 16).any()
        if has_full != (QFULL in x) or (QFULL in x) != (QSLOT in x):
            problems.append("qfull/qslot must be present exactly when a row is at 16 bits")
        elif has_full:
            slot = jax.device_get(x[QSLOT])
            m = x[QFULL].shape[0]
            if x[QFULL].shape[1:] != q.shape[1:] or slot.shape != (n,):
                problems.append(f"qfull {x[QFULL].shape} / qslot {slot.shape} do not fit {q.shape}")
            elif ((slot >= 0) != (bits == 16)).any() or slot.max() >= m:
                problems.append("qslot must index qfull exactly in the 16-bit rows")
        if problems:
            raise QuantizedError("malformed quantized kernel: " + "; ".join(problems))
        return x

    map_leaves(one, blocks)


def row_bits(blocks):
    """Bit width of each row (int8 [n]; 16 everywhere for a float table)."""
    found = []
    map_leaves(lambda x: found.append(x[QBITS]) if is_leaf(x) else None, blocks)
    return found[0] if found else jnp.full(rows(blocks), 16, jnp.int8)
