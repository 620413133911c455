"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import DepthjaxError


class GenerationError(DepthjaxError):
    """Generation arguments that do not fit the model or each other."""


def filter_logits(logits_BV, *, top_k: int | None = None, top_p: float | None = None):
    """Set logits outside the top-k / top-p nucleus to -inf (ties at the cut are kept).

    top-p keeps the smallest set of most likely tokens whose probability reaches p (the
    token that crosses p is kept, so at least one token always survives).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    if top_k is not None:
        if not 1 <= top_k:
            raise GenerationError(f"top_k must be >= 1, got {top_k}")
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, V))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly better tokens
        keep_BV = before_BV < top_p
        cut_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cut_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample(
    logits_BV,
    key,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
):
    """int32 [B]: argmax at temperature 0, else a draw from softmax(filtered logits / T)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
