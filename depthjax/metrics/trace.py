"""Metrics read from one traced forward: block influence (ShortGPT), angular distance
(Gromov et al.), relative contribution (Csordás et al.), module similarity ("What Matters
in Transformers?", He et al.) and the residual norm.

`trace_statistics` runs one compiled forward per batch and accumulates every sum on
device; each metric is a view of those sums, and `trace_metrics` returns them all.
Distances use forms that are exactly 0 for identical vectors, so a step whose gates are
0 scores exactly 0: 1 - cos(a, b) = |â - b̂|² / 2 and angle(a, b) = 2 atan2(|â - b̂|, |â + b̂|).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import progress
from ..core.model import DepthModel, apply
from .batches import as_batches, row_chunks
from .scores import MetricError, Scores

_EPS = 1e-12


def _unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def one_minus_cos(a, b):
    return 0.5 * jnp.sum((_unit(a) - _unit(b)) ** 2, axis=-1)


def cos(a, b):
    return 1.0 - one_minus_cos(a, b)


def angle(a, b):
    """Angle between a and b in radians, stable near 0 and pi."""
    ua, ub = _unit(a), _unit(b)
    return 2.0 * jnp.arctan2(jnp.linalg.norm(ua - ub, axis=-1), jnp.linalg.norm(ua + ub, axis=-1))


def _ratio(u, x):
    return jnp.linalg.norm(u, axis=-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1), _EPS)


def last_real_index(mask_BT):
    """Index of the last real token of each row [B]."""
    T = mask_BT.shape[1]
    return T - 1 - jnp.argmax(mask_BT[:, ::-1] > 0, axis=1)


@jax.jit
def _batch_sums(model: DepthModel, tokens_BT, mask_BT) -> dict:
    _, tr = apply(model, tokens_BT, mask=mask_BT, trace=True)
    res = tr.residual.astype(jnp.float32)  # [S+1, B, T, D]
    u_attn, u_mlp = tr.attn_out.astype(jnp.float32), tr.mlp_out.astype(jnp.float32)
    x_in, h = res[:-1], res[:-1] + u_attn
    w = mask_BT.astype(jnp.float32)
    tok_sum = lambda v: jnp.sum(v * w, axis=(-2, -1))  # [..., B, T] -> [...]
    last = res[:, jnp.arange(res.shape[1]), last_real_index(mask_BT)]  # [S+1, B, D]
    ang = angle(last[:, None], last[None, :]) / jnp.pi  # [S+1, S+1, B]
    return {
        "tokens": jnp.sum(w),
        "rows": jnp.asarray(res.shape[1], jnp.float32),
        "residual_norm": tok_sum(jnp.linalg.norm(res, axis=-1)),
        "block_influence": tok_sum(one_minus_cos(res[:-1], res[1:])),
        "angular": jnp.sum(ang, axis=-1),
        "ratio_attn": tok_sum(_ratio(u_attn, x_in)),
        "ratio_mlp": tok_sum(_ratio(u_mlp, h)),
        "ratio_block": tok_sum(_ratio(u_attn + u_mlp, x_in)),
        "cos_attn": tok_sum(cos(u_attn, x_in) * (jnp.linalg.norm(u_attn, axis=-1) > 0)),
        "cos_mlp": tok_sum(cos(u_mlp, h) * (jnp.linalg.norm(u_mlp, axis=-1) > 0)),
        "cos_block": tok_sum(
            cos(u_attn + u_mlp, x_in) * (jnp.linalg.norm(u_attn + u_mlp, axis=-1) > 0)
        ),
        # module similarity: 1 - cos(sublayer input, sublayer output), residual included
        "module_attn": tok_sum(one_minus_cos(x_in, h)),
        "module_mlp": tok_sum(one_minus_cos(h, h + u_mlp)),
    }


def trace_statistics(model: DepthModel, batches, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Means over real tokens (rows, for the last-token angular matrix) of every trace sum.

    chunk: rows per forward (None: each batch whole). One forward holds the trace of
    `chunk` rows, (3 * depth + 1) * chunk * T * D floats (residual stack and both
    sublayer outputs), plus attention's scores, blockwise when T * T > 4 *
    `ModelConfig.attention_chunk` ** 2 (depthjax.core.blockwise): memory linear in T."""
    total = None
    data = row_chunks(as_batches(batches, model.config.vocab_size), chunk)
    for b in progress.track(data, "trace metrics"):
        sums = _batch_sums(model, b.tokens, b.mask)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    out = {
        k: v / total["tokens"] for k, v in total.items() if k not in ("tokens", "rows", "angular")
    }
    out["angular"] = total["angular"] / total["rows"]  # [S+1, S+1]
    return out


def _from_stats(stats, name, span=1):
    norm = {"residual_norm": stats["residual_norm"]}
    if name == "block_influence":
        return Scores(name, "block", stats["block_influence"], norm)
    if name == "angular_distance":
        S = len(stats["residual_norm"]) - 1
        if not isinstance(span, (int, np.integer)) or not 1 <= span <= S:
            raise MetricError(f"span must be an integer in 1..{S} (the depth), got {span!r}")
        d = np.array([stats["angular"][i, i + span] for i in range(S - span + 1)])
        return Scores(
            name,
            "block" if span == 1 else "span",
            d,
            {**norm, "span": span, "best_start": int(np.argmin(d))},
        )
    raise KeyError(name)


def block_influence(model: DepthModel, batches, chunk: int | None = None) -> Scores:
    """1 - mean over real tokens of cos(residual[i], residual[i+1]), per step.
    chunk: rows per forward (memory bound: `trace_statistics`)."""
    return _from_stats(trace_statistics(model, batches, chunk), "block_influence")


def angular_distance(model: DepthModel, batches, span: int = 1, chunk: int | None = None) -> Scores:
    """arccos(cos(residual[i], residual[i+span])) / pi on each row's last real token,
    averaged over rows, for every start i; extra["best_start"] is the span to drop."""
    return _from_stats(trace_statistics(model, batches, chunk), "angular_distance", span)


def relative_contribution(
    model: DepthModel, batches, chunk: int | None = None
) -> dict[str, Scores]:
    """Per step: |attn update| / |residual in|, |mlp update| / |residual after attention|,
    |block update| / |residual in|, with the matching cosines in extra["cos"]."""
    return _contributions(trace_statistics(model, batches, chunk))


def _contributions(stats) -> dict[str, Scores]:
    norm = stats["residual_norm"]
    return {
        u: Scores(
            f"relative_contribution_{u}",
            u,
            stats[f"ratio_{u}"],
            {"cos": stats[f"cos_{u}"], "residual_norm": norm},
        )
        for u in ("attn", "mlp", "block")
    }


def _module_similarity(stats) -> Scores:
    return Scores(
        "module_similarity",
        "sublayer",
        np.concatenate([stats["module_attn"], stats["module_mlp"]]),
        {"residual_norm": stats["residual_norm"]},
    )


def module_similarity(model: DepthModel, batches, chunk: int | None = None) -> Scores:
    """ "What Matters in Transformers?": 1 - mean cos(X, Y) over real tokens of each
    sublayer's input X and output Y (the residual after its update), for the attention
    sublayers of steps 0..S-1 then the MLPs: unit "sublayer", for prune(unit="sublayer")."""
    return _module_similarity(trace_statistics(model, batches, chunk))


def residual_norm(model: DepthModel, batches, chunk: int | None = None) -> np.ndarray:
    """Mean |residual[i]| over real tokens, i = 0..depth."""
    return trace_statistics(model, batches, chunk)["residual_norm"]


def trace_metrics(
    model: DepthModel, batches, span: int = 1, chunk: int | None = None
) -> dict[str, Scores]:
    """Every trace metric from one pass over the batches (chunk: rows per forward)."""
    stats = trace_statistics(model, batches, chunk)
    out = {
        "block_influence": _from_stats(stats, "block_influence"),
        "angular_distance": _from_stats(stats, "angular_distance", span),
    }
    out.update({f"relative_contribution_{k}": v for k, v in _contributions(stats).items()})
    out["module_similarity"] = _module_similarity(stats)
    return out
