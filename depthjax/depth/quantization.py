"""Layer-wise weight-only quantization with a bit width per table row, chosen by importance.

    qmodel = dj.depth.quantize(model, {0: 16, 1: 8, 2: 4, 3: 4})      # bits per table row
    qmodel = dj.depth.quantize(model, scores, average=6)              # from a Scores object
    dj.depth.table_bytes(model), dj.depth.table_bytes(qmodel)          # memory before / after
    dj.depth.dequantize(qmodel)                                       # the float table again

Each kernel of a row at b < 16 bits is quantized group-wise and symmetrically: the inputs of
the kernel (its leading axes; [H, Dh] for the attention output) are cut into groups of
`group_size` consecutive values (the largest divisor of the input size up to it), and each
(group, output) pair gets one scale s = max|w| / (2**(b-1) - 1); q = round(w / s), so that
|w - q * s| <= s / 2 for every weight. A row at 16 bits is not quantized at all: it runs
bit-identical to the original. Norm weights and biases stay in floats. The storage (int8
for 4 and 8 bits, one stacked table, a side table for 16-bit rows) is described in
depthjax.core.quant; the rows are dequantized inside the step, so dj.apply, the metrics,
dj.generate and dj.specialize run a quantized model like any other.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..core import quant, rows as rows_lib, step_params as steps_lib
from ..core.model import DepthModel
from ..core.quant import QuantizedError

WIDTHS = (4, 8, 16)


def _check_widths(bits: np.ndarray) -> None:
    bad = sorted(set(bits.tolist()) - set(WIDTHS))
    if bad:
        raise QuantizedError(f"bit widths must be 4, 8 or 16, got {bad}")


def row_importance(model: DepthModel, scores) -> np.ndarray:
    """Importance of each table row from per-step block scores (higher = more important):
    the sum over the steps that run the row; rows no step runs are the least important."""
    if getattr(scores, "unit", "block") != "block":
        raise QuantizedError(
            f"quantize needs block scores (one per step), got unit {scores.unit!r}"
        )
    values = np.asarray(scores, np.float64)
    if values.shape != (model.depth,):
        raise QuantizedError(
            f"scores hold {values.shape} values; the program has {model.depth} steps"
        )
    out = np.full(model.n_blocks, -np.inf)
    for step, row in enumerate(np.asarray(model.program.block)):
        out[row] = values[step] if np.isinf(out[row]) else out[row] + values[step]
    return out


def allocate(importance, average: float, widths=(4, 8)) -> np.ndarray:
    """Bit widths per row with mean <= `average`, the most important rows keeping the most
    bits: every row starts at the narrowest width, then, from the most important row down,
    each row takes the widest width the remaining budget allows (ties: lower row first)."""
    widths = sorted(set(int(w) for w in widths))
    _check_widths(np.asarray(widths))
    importance = np.asarray(importance, np.float64)
    n = len(importance)
    if not widths[0] <= average:
        raise QuantizedError(f"average={average} is below the narrowest width {widths[0]}")
    bits = np.full(n, widths[0])
    budget = average * n
    for row in np.argsort(-importance, kind="stable"):
        for w in reversed(widths):
            if w > bits[row] and bits.sum() - bits[row] + w <= budget + 1e-9:
                bits[row] = w
                break
    return bits


def _row_bits(model: DepthModel, bits, average, widths) -> np.ndarray:
    n = model.n_blocks
    if hasattr(bits, "values") and hasattr(bits, "unit"):  # a metrics Scores object
        if average is None:
            raise QuantizedError("quantize(model, scores) needs average= (a mean bit width)")
        return allocate(row_importance(model, bits), average, widths)
    if average is not None:
        raise QuantizedError("average= applies only when bits is a Scores object")
    if isinstance(bits, (int, np.integer)):
        out = np.full(n, int(bits))
    elif isinstance(bits, Mapping):
        bad = [r for r in bits if not isinstance(r, (int, np.integer)) or not 0 <= r < n]
        if bad:
            raise QuantizedError(f"rows {bad} are not rows of the table (0..{n - 1})")
        out = np.full(n, 16)
        for r, b in bits.items():
            out[int(r)] = b
    else:
        out = np.asarray(bits)
        if out.shape != (n,) or not np.issubdtype(out.dtype, np.integer):
            raise QuantizedError(
                f"bits must be an int, a {{row: bits}} dict, {n} ints or a Scores object; "
                f"got {out.dtype}{list(out.shape)}"
            )
    _check_widths(out)
    return out.astype(np.int64)


def group_size_for(n_in: int, group_size: int) -> int:
    """The largest divisor of n_in that is <= group_size."""
    return max(g for g in range(1, min(group_size, n_in) + 1) if n_in % g == 0)


def quantize_kernel(table, bits, n_in_dims: int, group_size: int) -> dict:
    """One kernel table [n, *in, *out] -> the quantized dict of depthjax.core.quant."""
    n, shape = table.shape[0], table.shape[1:]
    n_in = int(np.prod(shape[:n_in_dims]))
    out_shape = shape[n_in_dims:]
    g = group_size_for(n_in, group_size)
    w = jnp.asarray(table).astype(jnp.float32).reshape((n, n_in // g, g) + out_shape)
    qmax = (2.0 ** (np.minimum(bits, 8) - 1) - 1).reshape((n,) + (1,) * (w.ndim - 1))
    amax = jnp.max(jnp.abs(w), axis=2, keepdims=True)
    scale = (amax / qmax).astype(table.dtype)  # stored in the kernel's dtype ...
    s32 = scale.astype(jnp.float32)
    low = s32 < amax / qmax  # ... rounded up, so that |w / s| <= qmax still holds
    scale = jnp.where(
        low, (amax / qmax * (1 + jnp.finfo(table.dtype).eps)).astype(table.dtype), scale
    )
    s32 = scale.astype(jnp.float32)
    q = jnp.clip(jnp.round(w / jnp.where(s32 > 0, s32, 1.0)), -qmax, qmax)
    full = np.flatnonzero(bits == 16)
    keep = jnp.asarray(bits != 16).reshape((n,) + (1,) * (w.ndim - 1))
    out = {
        quant.QINT: jnp.where(keep, q, 0).astype(jnp.int8).reshape(table.shape),
        quant.QSCALE: jnp.where(keep, scale, 0).squeeze(2),
        quant.QBITS: jnp.asarray(bits, jnp.int8),
    }
    if full.size:
        slot = np.full(n, -1, np.int32)
        slot[full] = np.arange(full.size)
        out[quant.QFULL] = jnp.asarray(table)[full]
        out[quant.QSLOT] = jnp.asarray(slot)
    return out


def quantize(
    model: DepthModel,
    bits,
    *,
    average: float | None = None,
    widths=(4, 8),
    group_size: int = 64,
) -> DepthModel:
    """The model with its table's kernels quantized row by row (weight-only, group-wise,
    symmetric); see the module docstring.

    bits: an int for every row; {row: 4 | 8 | 16} (rows not named stay at 16: unquantized);
    a sequence of n_blocks widths; or a Scores object of block scores (one per step, higher
    = more important, e.g. dj.metrics.block_influence or ablation) with `average`, the mean
    bit width over rows, spread by `allocate` among `widths` (default 4 and 8; add 16 to
    let the most important rows stay unquantized). group_size: inputs per scale.
    """
    blocks = model.params["blocks"]
    if quant.is_quantized(blocks):
        raise QuantizedError("the model is already quantized; dequantize it first")
    blocks = rows_lib.floats(blocks)  # a linearly expanded table quantizes as its rows
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise QuantizedError(f"group_size must be a positive int, got {group_size!r}")
    row_bits = _row_bits(model, bits, average, widths)
    flat = traverse_util.flatten_dict(blocks)
    out = {
        path: quantize_kernel(t, row_bits, steps_lib.kernel_in_dims(path), int(group_size))
        if path[-1] == "kernel"
        else t
        for path, t in flat.items()
    }
    params = {**model.params, "blocks": traverse_util.unflatten_dict(out)}
    return model.replace(params=params)


def dequantize(model: DepthModel) -> DepthModel:
    """The model with a plain float table: each row as the step runs it (quantized rows
    dequantized, linearly expanded ones computed)."""
    return model.replace(params={**model.params, "blocks": rows_lib.floats(model.params["blocks"])})


def row_bits(model: DepthModel) -> np.ndarray:
    """Bit width of each table row (16 everywhere for a float table)."""
    found = quant.row_bits(model.params["blocks"])
    if found is None:
        return np.full(model.n_blocks, 16, np.int64)
    return np.asarray(jax.device_get(found), np.int64)


def table_bytes(model: DepthModel, *, packed: bool = False) -> int:
    """Bytes the block table holds (every leaf of params["blocks"], scales and the 16-bit
    side table included). packed=True counts 4-bit rows' integers at half a byte each (what
    nibble packing would store; depthjax keeps them one per byte so all rows share int8)."""
    total = 0

    def one(x):
        nonlocal total
        leaves = jax.tree.leaves(x)
        total += sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in leaves)
        if packed and quant.is_leaf(x):
            per_row = int(np.prod(x[quant.QINT].shape[1:]))
            total -= per_row * int((np.asarray(x[quant.QBITS]) == 4).sum()) // 2

    rows_lib.map_leaves(one, model.params["blocks"])
    return total
