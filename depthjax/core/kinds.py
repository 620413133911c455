"""Per-row attention kinds of the block table: which rows attend globally and which
through a sliding window with their own RoPE base.

`ModelConfig.layer_types` holds one letter per table row ("G" global, "L" local). Inside
the forward they become int arrays over the rows -- each row's window (GLOBAL, a sentinel
no distance reaches, for global rows) and RoPE table -- gathered with the program's block
ids at every step, exactly like the row's weights. So dropping, looping or reordering
steps carries each row's kind along, and one compiled forward serves every program.
Transforms that rewrite the table (tie, compact, grow, materialize) rewrite
`layer_types` with the same row indices (`take`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

GLOBAL = np.iinfo(np.int32).max  # window of a global row: t - s < GLOBAL for every key


def windowed(cfg: ModelConfig) -> bool:
    """Whether any row has a sliding window (static: the masked attention path)."""
    return "L" in (cfg.layer_types or "")


def row_windows(cfg: ModelConfig) -> np.ndarray:
    """int32 [n_layers]: a query at t of row r sees keys s with t - s < window[r]."""
    local = np.asarray([t == "L" for t in cfg.layer_types or "G" * cfg.n_layers])
    return np.where(local, cfg.sliding_window or GLOBAL, GLOBAL).astype(np.int32)


def row_rope_tables(cfg: ModelConfig) -> np.ndarray:
    """int32 [n_layers]: the RoPE table of each row (1 = local_rope_theta; depthjax.core.rope)."""
    if cfg.local_rope_theta is None:
        return np.zeros(cfg.n_layers, np.int32)
    return (row_windows(cfg) != GLOBAL).astype(np.int32)


def row_kind(cfg: ModelConfig, row) -> dict:
    """Attention keyword arguments of table row `row` (an int, may be traced): its
    `window` (if any row has one) and `rope_table` (if the model has a local RoPE)."""
    kind = {}
    if windowed(cfg):
        kind["window"] = jnp.asarray(row_windows(cfg))[row]
    if cfg.local_rope_theta is not None:
        kind["rope_table"] = jnp.asarray(row_rope_tables(cfg))[row]
    return kind


def step_kinds(cfg: ModelConfig, block) -> np.ndarray:
    """int32 [depth, 2]: the (window, RoPE table) each step of a program runs with."""
    block = np.asarray(block).reshape(-1)
    return np.stack([row_windows(cfg)[block], row_rope_tables(cfg)[block]], 1)


def changed_steps(before: np.ndarray, after: np.ndarray) -> list[int]:
    """Steps whose `step_kinds` differ between two programs of equal depth."""
    return np.flatnonzero((before != after).any(1)).tolist()


def take(cfg: ModelConfig, rows) -> str | None:
    """`layer_types` of a new table whose row j is the old row rows[j]."""
    if cfg.layer_types is None:
        return None
    return "".join(cfg.layer_types[int(r)] for r in np.asarray(rows).reshape(-1))


def describe(cfg: ModelConfig, row: int) -> str:
    """'global' or 'window 512' (plus the RoPE base where rows differ in it)."""
    window = int(row_windows(cfg)[row])
    text = "global" if window == GLOBAL else f"window {window}"
    if cfg.local_rope_theta is not None:
        theta = cfg.local_rope_theta if row_rope_tables(cfg)[row] else cfg.rope_theta
        text += f", rope {theta:g}"
    return text
