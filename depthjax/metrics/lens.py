"""Logit lens and skip effect: what the residual stream says at each depth, and how
skipping one step changes every later step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import progress
from ..core.loss import kl_rows, nll_sums, require_causal
from ..core.model import DepthModel, Head, apply
from .batches import as_batches
from .scores import MetricError, Scores

_EPS = 1e-12


@jax.jit
def _lens_sums(model: DepthModel, tokens_BT, mask_BT):
    final, tr = apply(model, tokens_BT, mask=mask_BT, trace=True)
    params = model.params
    tok = params["embed"]["tok"]["embedding"]

    def decode(x_BTD):  # the model's own final norm and head
        logits = Head(model.config).apply({"params": params["head"]}, x_BTD, tok)
        nll, n = nll_sums(logits, tokens_BT, mask_BT)
        return nll, n, jnp.sum(kl_rows(final, logits) * mask_BT)

    nll, n, kl = jax.lax.map(decode, tr.residual)  # [S+1] each
    return nll, n, kl, jnp.sum(mask_BT)


def logit_lens(model: DepthModel, batches) -> Scores:
    """Next-token loss of decoding residual[i] (i = 0..depth) with the final norm and head;
    extra["kl"] is the mean KL(final distribution || lens distribution) per token."""
    require_causal(model, "logit_lens", MetricError)
    nll = n = kl = tokens = 0.0
    for b in progress.track(as_batches(batches, model.config.vocab_size), "logit lens"):
        a, c, k, t = _lens_sums(model, b.tokens, b.mask)
        nll, n, kl, tokens = nll + a, n + c, kl + k, tokens + t
    return Scores("logit_lens_loss", "span", np.asarray(nll / n), {"kl": np.asarray(kl / tokens)})


@jax.jit
def _skip_sums(model: DepthModel, tokens_BT, mask_BT):
    S = model.depth
    full, tr = apply(model, tokens_BT, mask=mask_BT, trace=True)
    u_full = (tr.attn_out + tr.mlp_out).astype(jnp.float32)  # [S, B, T, D]
    w = mask_BT.astype(jnp.float32)

    def skip(s):
        prog = model.program
        off = jnp.arange(S) == s
        program = prog.replace(
            attn=jnp.where(off, 0.0, prog.attn), mlp=jnp.where(off, 0.0, prog.mlp)
        )
        logits, t = apply(model.replace(program=program), tokens_BT, mask=mask_BT, trace=True)
        u = (t.attn_out + t.mlp_out).astype(jnp.float32)
        rel = jnp.linalg.norm(u - u_full, axis=-1) / jnp.maximum(
            jnp.linalg.norm(u_full, axis=-1), _EPS
        )
        return jnp.sum(rel * w, axis=(-2, -1)), jnp.sum(kl_rows(full, logits) * w)

    rel, kl = jax.lax.map(skip, jnp.arange(S))  # [S, S], [S]
    return rel, kl, jnp.sum(w)


def skip_effect(model: DepthModel, batches) -> dict[str, np.ndarray]:
    """For each skipped step s (both gates 0): "update_change"[s, j], the mean relative
    change |u_j(skip s) - u_j| / |u_j| of every later step's update (NaN for j <= s), and
    "output_kl"[s], the mean KL(full || skipped) of the output distribution."""
    rel = kl = tokens = 0.0
    for b in progress.track(as_batches(batches, model.config.vocab_size), "skip effect"):
        r, k, t = _skip_sums(model, b.tokens, b.mask)
        rel, kl, tokens = rel + r, kl + k, tokens + t
    rel = np.asarray(rel / tokens, np.float64)
    S = model.depth
    rel[np.tril(np.ones((S, S), bool))] = np.nan
    return {"update_change": rel, "output_kl": np.asarray(kl / tokens, np.float64)}
