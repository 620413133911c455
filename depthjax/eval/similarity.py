"""A representation measure for encoders (and any model): the cosine between the pooled
final hidden states of each program and of the full model (the model's own program), on
the same token batches. 1 for the full model; it falls as a program drifts from it.

Encoders (the bert family, sentence-transformers directories) define no next-token loss,
so this is what depthjax.metrics measure for them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel, apply
from ..core.program import map_programs, share_structure
from ..hf.pooling import pool
from ..metrics.batches import as_batches
from ..metrics.coalitions import chunk_size
from .scoring import EvalError, stack_programs


def _pooled(model, tokens_BT, mask_BT, mode, normalize):
    hidden_BTD = apply(model, tokens_BT, mask=mask_BT, output="hidden").astype(jnp.float32)
    return pool(hidden_BTD, mask_BT, mode=mode, normalize=normalize)


_embed = jax.jit(_pooled, static_argnames=("mode", "normalize"))


@functools.partial(jax.jit, static_argnames=("mode", "normalize", "chunk"))
def _cosine_sums(model, programs, tokens_BT, mask_BT, ref_BD, *, mode, normalize, chunk):
    """[K] sums over rows of cos(pooled output of each program, ref_BD)."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def one(program):
        out_BD = _pooled(model.replace(program=program), tokens_BT, mask_BT, mode, normalize)
        return jnp.sum(unit(out_BD) * unit(ref_BD))

    return map_programs(one, programs, batch_size=chunk)


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

    def _references(self, model):
        if self.reference is None:
            return [
                _embed(model, b.tokens, b.mask, mode=self.pooling, normalize=self.normalize)
                for b in self.batches
            ]
        if self._ref is None:
            self._ref = [
                _embed(
                    self.reference, b.tokens, b.mask, mode=self.pooling, normalize=self.normalize
                )
                for b in self.batches
            ]
        return self._ref

    def cosine(self, model: DepthModel, programs=None) -> np.ndarray:
        """[K] mean cosine over rows."""
        stacked, _ = stack_programs(model, programs)
        if stacked is None:
            raise EvalError(
                "representation similarity compares encoders; a stitched model is not one"
            )
        total, rows = 0.0, 0
        for b, ref_BD in zip(self.batches, self._references(model)):
            total = total + _cosine_sums(
                model,
                share_structure(stacked),  # gate-only batches share each gathered row
                b.tokens,
                b.mask,
                ref_BD,
                mode=self.pooling,
                normalize=self.normalize,
                chunk=chunk_size(stacked.block.shape[0], b.tokens.shape, model.config),
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

    def measure(self, model: DepthModel, programs) -> np.ndarray:
        return 1.0 - self.cosine(model, programs)


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
