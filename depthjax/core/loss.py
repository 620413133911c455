"""The next-token loss, defined once for metrics, recovery and training.

Two layouts of the same quantity, sum of -log p(target) over real targets and their count:

* `nll_sums(logits_BTV, tokens_BT, mask_BT)`: unshifted tokens with a padding mask
  (metrics, recovery, evaluation): position t predicts token t+1 where both are real;
* `row_nll_sums`: the same per row (per-example search; `loss_measure` is its objective
  form);
* `packed_nll_sums(logits_BTV, targets_BT, segment_ids_BT)`: the training layout, inputs
  and targets already shifted and documents packed into segments (0 = padding).

Sums, not means, so callers accumulate over batches (and micro-batches) exactly. Shapes
are asserted with chex when traced (no run-time cost): a misaligned call is a bug in the
caller, reported where it happens instead of as a broadcast.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax


def weighted_nll_rows(logits_BTV, labels_BT, weight_BT):
    """Per row [B]: (sum of weight * cross-entropy(logits, label), sum of weight), float32."""
    chex.assert_rank(logits_BTV, 3)
    chex.assert_equal_shape([labels_BT, weight_BT, logits_BTV[..., 0]])
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), labels_BT
    )
    return jnp.sum(nll_BT * weight_BT, axis=1), jnp.sum(weight_BT, axis=1)


def weighted_nll_sums(logits_BTV, labels_BT, weight_BT):
    """(sum of weight * cross-entropy(logits, label), sum of weight), in float32."""
    s_B, w_B = weighted_nll_rows(logits_BTV, labels_BT, weight_BT)
    return jnp.sum(s_B), jnp.sum(w_B)


def row_nll_sums(logits_BTV, tokens_BT, mask_BT=None):
    """Per row [B]: position t predicts token t+1 where both are real (mask 1; None: every
    token is real)."""
    mask_BT = jnp.ones(tokens_BT.shape) if mask_BT is None else jnp.asarray(mask_BT, jnp.float32)
    chex.assert_equal_shape([tokens_BT, mask_BT])
    w_BT = mask_BT[:, 1:] * mask_BT[:, :-1]
    return weighted_nll_rows(logits_BTV[:, :-1], tokens_BT[:, 1:], w_BT)


def nll_sums(logits_BTV, tokens_BT, mask_BT=None):
    """Position t predicts token t+1 where both are real (mask 1; None: all real)."""
    s_B, w_B = row_nll_sums(logits_BTV, tokens_BT, mask_BT)
    return jnp.sum(s_B), jnp.sum(w_B)


def loss_measure(logits_BTV, batch: dict) -> dict:
    """The next-token loss as an objective measure (depthjax.search.objective): per-row
    sums under "score", their counts under "weight"."""
    s_B, w_B = row_nll_sums(logits_BTV, batch["tokens"], batch["mask"])
    return {"score": s_B, "weight": w_B}


def kl_rows(p_logits, q_logits):
    """KL(p || q) per position [...], from logits [..., V] of the two distributions."""
    lp, lq = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), -1)


def packed_nll_sums(logits_BTV, targets_BT, segment_ids_BT):
    """Position t predicts targets[t] wherever it belongs to a segment (id > 0)."""
    return weighted_nll_sums(logits_BTV, targets_BT, (segment_ids_BT > 0).astype(jnp.float32))


def require_causal(model, what: str, error: type[Exception]) -> None:
    """The next-token loss needs a causal model: a clear `error` for an encoder."""
    if not model.config.causal:
        raise error(
            f"{what} uses the next-token loss, which a bidirectional "
            f"{model.config.family} encoder does not define; use measure='hidden' "
            "or a representation task (depthjax.eval.Representation)"
        )
