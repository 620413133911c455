"""Batches for metrics: normalization of user input and the next-token loss sums."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax


class Batch(NamedTuple):
    tokens: np.ndarray        # int32 [B, T]
    mask: np.ndarray          # float32 [B, T], 1 for real tokens


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
            raise ValueError(f"batch {i}: tokens must be an int array [batch, time], got "
                             f"{tokens.dtype} {tokens.shape}")
        mask = np.ones(tokens.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != tokens.shape:
            raise ValueError(f"batch {i}: mask shape {mask.shape} != tokens shape {tokens.shape}")
        if mask.sum() == 0:
            raise ValueError(f"batch {i} has no real tokens (its mask is all zeros)")
        out.append(Batch(tokens.astype(np.int32), mask))
    if not out:
        raise ValueError("no batches: metrics need at least one batch of tokens")
    return out


def nll_sums(logits_BTV, tokens_BT, mask_BT):
    """(sum of next-token negative log-likelihoods, number of predicted tokens): position t
    predicts token t+1 where both are real."""
    w = mask_BT[:, 1:] * mask_BT[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1].astype(jnp.float32),
                                                          tokens_BT[:, 1:])
    return jnp.sum(nll * w), jnp.sum(w)


def require_causal(model, what: str) -> None:
    if not model.config.causal:
        raise ValueError(f"{what} uses the next-token loss, which a bidirectional "
                         f"{model.config.family} encoder does not define; use measure='logit' "
                         "or a representation task (depthjax.eval.Representation)")
