"""Batches for metrics: normalization of user input (the loss itself is depthjax.core.loss)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..core.model import check_ids
from .scores import MetricError

_KEYS = ("tokens", "mask")


class Batch(NamedTuple):
    tokens: np.ndarray  # int32 [B, T]
    mask: np.ndarray  # float32 [B, T], 1 for real tokens


def as_batches(batches, vocab_size: int | None = None) -> list[Batch]:
    """Accept one token array [B, T], or an iterable of token arrays or of dicts with
    "tokens" and an optional padding "mask" (1 = real token), or the Batches this returns.
    With `vocab_size`, every token id must be in 0..vocab_size-1. Other dict keys (e.g.
    "token_types") raise MetricError: metrics would silently ignore them."""
    if isinstance(batches, (np.ndarray, jnp.ndarray)) or isinstance(batches, dict):
        batches = [batches]
    out = []
    for i, b in enumerate(batches if isinstance(batches, Iterable) else [batches]):
        b = b._asdict() if isinstance(b, Batch) else b
        tokens, mask = (b.get("tokens"), b.get("mask")) if isinstance(b, dict) else (b, None)
        extra = sorted(set(b) - set(_KEYS)) if isinstance(b, dict) else []
        if extra:
            raise MetricError(
                f"batch {i} has keys {extra} that metrics do not read (they read "
                f"{list(_KEYS)}); a token_types input would be silently ignored, "
                "so score single-segment inputs"
            )
        if tokens is None:
            raise MetricError(f"batch {i} has no 'tokens'")
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise MetricError(
                f"batch {i}: tokens must be an int array [batch, time], got "
                f"{tokens.dtype} {tokens.shape}"
            )
        if vocab_size is not None:
            check_ids(tokens, vocab_size, f"batch {i}: tokens", MetricError)
        mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != tokens.shape:
            raise MetricError(f"batch {i}: mask shape {mask.shape} != tokens shape {tokens.shape}")
        if mask.sum() == 0:
            raise MetricError(f"batch {i} has no real tokens (its mask is all zeros)")
        out.append(Batch(tokens.astype(np.int32), mask))
    if not out:
        raise MetricError("no batches: metrics need at least one batch of tokens")
    return out


def row_chunks(batches: list[Batch], chunk: int | None) -> list[Batch]:
    """Each batch split into consecutive slices of at most `chunk` rows (None: as they are).

    Metrics sum over rows, so the result is the same; a forward then holds activations
    (and a trace's [depth+1, rows, T, D] residual stack) for `chunk` rows at a time."""
    if chunk is None:
        return batches
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise MetricError(f"chunk must be a positive number of rows or None, got {chunk!r}")
    return [
        Batch(b.tokens[i : i + chunk], b.mask[i : i + chunk])
        for b in batches
        for i in range(0, len(b.tokens), chunk)
    ]
