"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Validated sampling settings (static: hashable, one compile per setting)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def create(cls, temperature=1.0, top_k=None, top_p=None) -> Sampler:
        """Checked on the host, with errors that name the bad value."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
            raise GenerationError(f"temperature must be a number >= 0, got {temperature!r}")
        if not (np.isfinite(temperature) and temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1
        ):
            raise GenerationError(f"top_k must be an integer >= 1, got {top_k!r}")
        if top_p is not None and (
            isinstance(top_p, bool)
            or not isinstance(top_p, (int, float, np.number))
            or not 0.0 < top_p <= 1.0
        ):
            raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
        return cls(
            float(temperature),
            None if top_k is None else int(top_k),
            None if top_p is None else float(top_p),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample(self, logits_BV, key):
        """int32 [B]: the next tokens (see `sample`)."""
        return sample(
            logits_BV, key, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )

    def probs(self, logits_BxV):
        """The sampling distribution [..., V] (temperature > 0): softmax of the filtered
        logits / temperature."""
        V = logits_BxV.shape[-1]
        z = filter_logits(
            logits_BxV.reshape(-1, V) / self.temperature, top_k=self.top_k, top_p=self.top_p
        )
        return jax.nn.softmax(z, -1).reshape(logits_BxV.shape)
