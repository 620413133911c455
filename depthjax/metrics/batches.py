"""Batches for metrics: normalization of user input (the loss itself is depthjax.loss)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, T]
    mask: np.ndarray  # float32 [B, T], 1 for real tokens


def as_batches(batches) -> list[Batch]:
    """Accept one token array [B, T], or an iterable of token arrays or of dicts with
    "tokens" and an optional padding "mask" (1 = real token)."""
    if isinstance(batches, (np.ndarray, jnp.ndarray)) or isinstance(batches, dict):
        batches = [batches]
    out = []
    for i, b in enumerate(batches if isinstance(batches, Iterable) else [batches]):
        tokens, mask = (b.get("tokens"), b.get("mask")) if isinstance(b, dict) else (b, None)
        if tokens is None:
            raise ValueError(f"batch {i} has no 'tokens'")
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"batch {i}: tokens must be an int array [batch, time], got "
                f"{tokens.dtype} {tokens.shape}"
            )
        mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != tokens.shape:
            raise ValueError(f"batch {i}: mask shape {mask.shape} != tokens shape {tokens.shape}")
        if mask.sum() == 0:
            raise ValueError(f"batch {i} has no real tokens (its mask is all zeros)")
        out.append(Batch(tokens.astype(np.int32), mask))
    if not out:
        raise ValueError("no batches: metrics need at least one batch of tokens")
    return out
