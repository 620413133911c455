"""A representation measure for encoders (and any model): the cosine between the pooled
final hidden states of each program and of the full model (the model's own program), on
the same token batches. 1 for the full model; it falls as a program drifts from it.

Encoders (the bert family, sentence-transformers directories) define no next-token loss,
so this is what depthjax.metrics measure for them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel, apply
from ..hf.pooling import pool
from ..metrics.batches import as_batches
from ..metrics.strategies import Reduction, evaluate
from .scoring import EvalError, stack_programs


def _pooled(model, tokens_BT, mask_BT, mode, normalize):
    hidden_BTD = apply(model, tokens_BT, mask=mask_BT, output="hidden").astype(jnp.float32)
    return pool(hidden_BTD, mask_BT, mode=mode, normalize=normalize)


_embed = jax.jit(_pooled, static_argnames=("mode", "normalize"))


def _cosine_sums(out_BTD, full_BTD, tokens_BT, mask_BT, ref_BD, *, mode, normalize):
    """Sum over rows of cos(pooled out, reference): ref_BD, or (None) the pooled full_BTD."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    pooled = lambda h: pool(h.astype(jnp.float32), mask_BT, mode=mode, normalize=normalize)
    ref_BD = pooled(full_BTD) if ref_BD is None else ref_BD
    return jnp.sum(unit(pooled(out_BTD)) * unit(ref_BD))


@dataclasses.dataclass(eq=False)
class Representation:
    """Cosine to the full model's pooled embeddings over `batches` (token arrays or
    {"tokens", "mask"} dicts, as metrics take). pooling: "mean" | "cls" | "max" (a
    sentence-transformers directory's own: `dj.hf.sentence_pooling(path)`). The
    reference is `reference` (e.g. the unpruned model) or, when None, the evaluated model's
    own program. `measure` is 1 - mean cosine."""

    batches: object
    pooling: str = "mean"
    normalize: bool = False
    reference: DepthModel | None = None
    name: str = "representation"

    def __post_init__(self):
        self.batches = as_batches(self.batches)
        self._ref = None

    def _references(self):
        """[B, D] pooled embeddings of `reference` per batch (computed once)."""
        if self._ref is None:
            self._ref = [
                _embed(
                    self.reference, b.tokens, b.mask, mode=self.pooling, normalize=self.normalize
                )
                for b in self.batches
            ]
        return self._ref

    def cosine(self, model: DepthModel, programs=None, *, strategy: str = "auto") -> np.ndarray:
        """[K] mean cosine over rows; strategy: see depthjax.metrics.strategies (the model's
        own output, the default reference, comes free with the prefix strategy)."""
        stacked, _ = stack_programs(model, programs)
        if stacked is None:
            raise EvalError(
                "representation similarity compares encoders; a stitched model is not one"
            )
        reduction = Reduction(
            _cosine_sums,
            "hidden",
            full=self.reference is None,
            options=(("mode", self.pooling), ("normalize", self.normalize)),
        )
        refs = self._references() if self.reference is not None else [None] * len(self.batches)
        total, rows = 0.0, 0
        for b, ref_BD in zip(self.batches, refs):
            total = total + evaluate(
                model, stacked, b.tokens, b.mask, reduction, ref_BD, strategy=strategy
            )
            rows += b.tokens.shape[0]
        return np.asarray(total, np.float64) / rows

    def evaluate(self, model: DepthModel, programs=None) -> dict:
        _, batched = stack_programs(model, programs)
        cos = self.cosine(model, programs)
        return {
            "cosine": cos if batched else float(cos[0]),
            "rows": sum(len(b.tokens) for b in self.batches),
        }

    def measure(self, model: DepthModel, programs, *, strategy: str = "auto") -> np.ndarray:
        return 1.0 - self.cosine(model, programs, strategy=strategy)


def representation(
    model: DepthModel,
    batches,
    *,
    programs=None,
    pooling: str = "mean",
    normalize: bool = False,
    reference: DepthModel | None = None,
) -> dict:
    """{"cosine": mean cosine between each program's pooled embeddings and the reference's
    (default: the model's own program), "rows"}."""
    return Representation(batches, pooling, normalize, reference).evaluate(model, programs)
