"""Metrics that evaluate the model with sets of units switched off: leave-one-out
ablation, Shapley values (exact from all coalitions, or antithetic Monte Carlo), the
present-minus-absent estimator and removal curves.

Every coalition is a *program* (the unit's gates set to 0) that differs from the model's
own only in its gates, so all coalitions of a call go through one compiled function and
no weights are copied per coalition. Two strategies, and `strategy="auto"` takes the one
that computes fewer FLOPs (`evaluation_costs`):

* "batched" (`batched_sums`): chunks of coalitions `vmap`-ed over their gates only. Each
  table row is gathered once per step and shared by the whole chunk (one wider matmul);
  under vmap a gated-off sublayer is selected away, not skipped, so every coalition costs
  a forward.
* "prefix" (`prefix_sums`): one coalition after another, each starting from the model's
  own residual at the first step where its gates differ (taken from one traced forward of
  the model), and skipping its gated-off sublayers at run time. All n leave-one-out
  ablations then cost about 1 + (n - 1) / 2 forwards.

Memory does not grow with the number of coalitions beyond a chunk's activations. The
measure of each coalition is accumulated over batches on device.

A unit is a step ("block": both gates), an attention or MLP sublayer ("attn", "mlp"), or
any sublayer ("sublayer": attn_0..attn_{S-1}, mlp_0..mlp_{S-1}, ranked jointly).
The measure of a coalition is its next-token loss ("loss"), the mean L2 distance of its
logits to the full model's ("logit"), or a task's (any object with `measure(model,
programs) -> [K]` and a `name`, e.g. a depthjax.eval task: 1 - accuracy, perplexity, or 1
- the representation cosine for encoders); lower is better, and a unit's value is how much
the measure rises without it. With a task, `batches` may be None: the task has its data.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import progress
from ..core.flops import sublayer_flops_per_token
from ..core.loss import nll_sums, require_causal
from ..core.model import DepthModel, apply, default_positions, output_head
from ..core.program import Program, map_programs
from ..core.walk import run_blocks
from .batches import as_batches, row_chunks
from .scores import MetricError, Scores

MEASURES = ("loss", "logit")
STRATEGIES = ("auto", "batched", "prefix")


def n_units(model: DepthModel, unit: str) -> int:
    if unit not in ("block", "attn", "mlp", "sublayer"):
        raise MetricError(f"unit must be 'block', 'attn', 'mlp' or 'sublayer', got {unit!r}")
    return 2 * model.depth if unit == "sublayer" else model.depth


def active_units(model: DepthModel, unit: str) -> np.ndarray:
    """bool [n_units]: which units are still on (a block always is; a sublayer whose gate
    is not 0)."""
    n_units(model, unit)
    a, m = np.asarray(model.program.attn) != 0, np.asarray(model.program.mlp) != 0
    return {
        "block": np.ones(model.depth, bool),
        "attn": a,
        "mlp": m,
        "sublayer": np.concatenate([a, m]),
    }[unit]


def coalition_gates(model: DepthModel, unit: str, keep) -> tuple[np.ndarray, np.ndarray]:
    """(attn, mlp) gates float32 [K, depth]: the model's gates with units where keep[k] == 0 off."""
    keep = np.asarray(keep, np.float32)  # [K, n_units]
    S, p = model.depth, model.program
    if keep.ndim != 2 or keep.shape[1] != n_units(model, unit):
        raise MetricError(f"coalition masks must be [K, {n_units(model, unit)}], got {keep.shape}")
    ones = np.ones((keep.shape[0], S), np.float32)
    attn_keep = {"block": keep, "attn": keep, "mlp": ones}.get(unit, keep[:, :S])
    mlp_keep = {"block": keep, "attn": ones, "mlp": keep}.get(unit, keep[:, S:])
    return np.asarray(p.attn) * attn_keep, np.asarray(p.mlp) * mlp_keep


def programs_for(model: DepthModel, unit: str, keep) -> Program:
    """Stacked programs [K, depth]: the model's program with units where keep[k] == 0 off."""
    attn, mlp = coalition_gates(model, unit, keep)
    tile = lambda a: jnp.broadcast_to(a, attn.shape)
    p = model.program
    return Program(
        block=tile(p.block), attn=jnp.asarray(attn), mlp=jnp.asarray(mlp), parallel=tile(p.parallel)
    )


def prefix_starts(program: Program, attn_KS, mlp_KS) -> np.ndarray:
    """int32 [K]: the step each coalition starts at, from `program`'s own residual there:
    its first step whose gates differ, moved back to the start of that parallel group
    (depth when nothing differs: only the head runs)."""
    differs = (attn_KS != np.asarray(program.attn)) | (mlp_KS != np.asarray(program.mlp))
    S = differs.shape[1]
    first = np.where(differs.any(1), differs.argmax(1), S)
    group_start = np.maximum.accumulate(np.where(~np.asarray(program.parallel), np.arange(S), 0))
    return np.where(first < S, group_start[np.minimum(first, S - 1)], S).astype(np.int32)


def evaluation_costs(model: DepthModel, attn_KS, mlp_KS, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of evaluating the coalitions with each strategy."""
    f = sublayer_flops_per_token(model.config, seq_len)
    K, S = attn_KS.shape
    full = (
        np.count_nonzero(np.asarray(model.program.attn)) * f["attn"]
        + np.count_nonzero(np.asarray(model.program.mlp)) * f["mlp"]
    )
    after = np.arange(S)[None] >= prefix_starts(model.program, attn_KS, mlp_KS)[:, None]
    prefix = (
        (full + f["head"])
        + np.sum(after * ((attn_KS != 0) * f["attn"] + (mlp_KS != 0) * f["mlp"]))
        + K * f["head"]
    )
    return {"batched": float(K * (S * (f["attn"] + f["mlp"]) + f["head"])), "prefix": float(prefix)}


def chunk_size(K: int, tokens_shape, cfg) -> int:
    """Programs evaluated at once: bounded so each chunk's activations stay near 256 MiB."""
    B, T = tokens_shape
    per_program = B * T * (cfg.vocab_size + 8 * cfg.d_model) * 4
    return int(max(1, min(K, (256 << 20) // per_program)))


def _measure_sums(logits, ref, tokens_BT, mask_BT, measure):
    if measure == "loss":
        return nll_sums(logits, tokens_BT, mask_BT)
    dist = jnp.linalg.norm(logits - ref, axis=-1)
    return jnp.sum(dist * mask_BT), jnp.sum(mask_BT)


@functools.partial(jax.jit, static_argnames=("measure", "chunk"))
def batched_sums(model, attn_KS, mlp_KS, tokens_BT, mask_BT, *, measure, chunk):
    """[K] (measure sums, weights): chunks of coalitions vmapped over their gates only."""
    ref = apply(model, tokens_BT, mask=mask_BT) if measure == "logit" else None

    def one(program):
        logits = apply(model.replace(program=program), tokens_BT, mask=mask_BT)
        return _measure_sums(logits, ref, tokens_BT, mask_BT, measure)

    programs = model.program.replace(attn=attn_KS, mlp=mlp_KS)  # block ids, flags shared
    return map_programs(one, programs, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("measure",))
def prefix_sums(model, attn_KS, mlp_KS, start_K, tokens_BT, mask_BT, *, measure):
    """[K] (measure sums, weights): coalition k runs from step start_K[k] on the model's own
    residual there, skipping its gated-off sublayers (one coalition at a time)."""
    cfg, params = model.config, model.params
    ref, trace = apply(model, tokens_BT, mask=mask_BT, trace=True)
    positions_BT = default_positions(tokens_BT)

    def one(xs):
        attn, mlp, start = xs
        program = model.program.replace(attn=attn, mlp=mlp)
        x_BTD, _ = run_blocks(
            cfg,
            params["blocks"],
            program,
            trace.residual[start],
            positions_BT,
            step_params=params.get("steps"),
            kv_mask_BT=mask_BT,
            start=start,
        )
        logits = output_head(cfg, params, x_BTD)
        return _measure_sums(logits, ref, tokens_BT, mask_BT, measure)

    return jax.lax.map(one, (attn_KS, mlp_KS, start_K))


def is_task(measure) -> bool:
    """Whether `measure` is a task object (it measures programs itself)."""
    return callable(getattr(measure, "measure", None))


def measure_name(measure) -> str:
    return measure.name if is_task(measure) else measure


def coalition_measures(
    model: DepthModel,
    batches,
    unit: str,
    keep,
    measure="loss",
    description: str = "coalitions",
    strategy: str = "auto",
    chunk: int | None = None,
):
    """Mean measure [K] of the model with each coalition keep[k] (1 = unit on); a task
    measures the programs itself. `description` labels the progress bar over batches;
    strategy: "batched", "prefix" or "auto" (fewer FLOPs; see the module docstring).

    chunk: rows per forward (None: each batch whole). A forward then holds, for `chunk`
    rows of T tokens, the logits of a few programs and (strategy "prefix") the model's
    [depth+1, chunk, T, D] residual stack; attention is blockwise when T * T > 4 *
    `ModelConfig.attention_chunk` ** 2, so memory is linear in T."""
    if is_task(measure):
        values = np.asarray(measure.measure(model, programs_for(model, unit, keep)), np.float64)
        if values.shape != (np.shape(keep)[0],):
            raise MetricError(
                f"task {measure_name(measure)!r} returned {values.shape} values "
                f"for {np.shape(keep)[0]} programs"
            )
        return values
    if measure not in MEASURES:
        raise MetricError(
            f"measure must be one of {MEASURES} or a task (an object with "
            f".measure(model, programs)), got {measure!r}"
        )
    if strategy not in STRATEGIES:
        raise MetricError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if measure == "loss":
        require_causal(model, "measure='loss'", MetricError)
    attn, mlp = coalition_gates(model, unit, keep)
    data = row_chunks(as_batches(batches, model.config.vocab_size), chunk)
    if strategy == "auto":
        costs = evaluation_costs(model, attn, mlp, data[0].tokens.shape[1])
        strategy = min(costs, key=costs.get)
    start = prefix_starts(model.program, attn, mlp)
    total = weight = 0.0
    for b in progress.track(data, f"{description} ({len(attn)} programs, {strategy})"):
        if strategy == "batched":
            s, w = batched_sums(
                model,
                attn,
                mlp,
                b.tokens,
                b.mask,
                measure=measure,
                chunk=chunk_size(len(attn), b.tokens.shape, model.config),
            )
        else:
            s, w = prefix_sums(model, attn, mlp, start, b.tokens, b.mask, measure=measure)
        total, weight = total + s, weight + w
    return np.asarray(total / weight, np.float64)


def loss(model: DepthModel, batches) -> float:
    """Mean next-token loss of the model as it is (its own program), over real tokens."""
    return float(
        coalition_measures(model, batches, "block", np.ones((1, model.depth)), description="loss")[
            0
        ]
    )


def _unique_measures(model, batches, unit, keep, measure, description, chunk=None):
    """Measures of coalition rows, evaluating each distinct coalition once."""
    uniq, inverse = np.unique(np.asarray(keep, np.int8), axis=0, return_inverse=True)
    m = coalition_measures(model, batches, unit, uniq, measure, description, chunk=chunk)
    return m[inverse.reshape(-1)]


def ablation(
    model: DepthModel, batches=None, unit: str = "block", measure="loss", chunk: int | None = None
) -> Scores:
    """Leave-one-out: rise of the measure when each unit alone is switched off.
    extra["full"] is the full model's measure. chunk: rows per forward
    (`coalition_measures`)."""
    n = n_units(model, unit)
    keep = np.vstack([np.ones((1, n)), 1 - np.eye(n)])
    m = coalition_measures(model, batches, unit, keep, measure, f"ablation {unit}", chunk=chunk)
    return Scores(f"ablation_{measure_name(measure)}", unit, m[1:] - m[0], {"full": float(m[0])})


def _permutations(n, num_permutations, key, antithetic):
    """[P, n] random orders; antithetic: P/2 orders (P rounded up to even) and their reverses."""
    k = -(-num_permutations // 2) if antithetic else num_permutations
    perms = np.asarray(jax.vmap(lambda kk: jax.random.permutation(kk, n))(jax.random.split(key, k)))
    return np.concatenate([perms, perms[:, ::-1]]) if antithetic else perms


def _exact_shapley(model, batches, unit, measure, n, chunk):
    """Exact Shapley values from all 2**n coalitions: phi_i = sum over S without i of
    |S|! (n-|S|-1)! / n! * (v(S + i) - v(S)), v = -measure."""
    idx = np.arange(1 << n)
    keep = ((idx[:, None] >> np.arange(n)) & 1).astype(np.int8)  # [2**n, n]
    v = -coalition_measures(model, batches, unit, keep, measure, chunk=chunk)
    size = keep.sum(1)
    weight = np.array(
        [
            math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
            for s in range(n + 1)
        ]
    )
    values = np.zeros(n)
    for i in range(n):
        without = idx[keep[:, i] == 0]
        values[i] = np.sum(weight[size[without]] * (v[without | (1 << i)] - v[without]))
    return values, float(v[-1] - v[0])


def shapley(
    model: DepthModel,
    batches=None,
    unit: str = "block",
    num_permutations: int | None = 16,
    key=None,
    measure="loss",
    *,
    max_coalitions: int = 4096,
    antithetic: bool = True,
    chunk: int | None = None,
) -> Scores:
    """Shapley values of the units for v(S) = -measure(S) (higher = more important).

    num_permutations=None: exact, from all 2**n coalitions (one compiled call) when
    2**n <= max_coalitions. Otherwise a Monte-Carlo permutation estimate: each
    permutation adds units one at a time from the empty coalition, a unit's value is the
    mean drop of the measure when it joins; antithetic=True pairs every random order with
    its reverse (a unit joining late in one joins early in the other, which cancels much
    of the order noise). extra["stderr"] is the estimator's standard error (0 when exact;
    over antithetic pairs). The values sum to v(all) - v(none) = measure(none) -
    measure(all), exactly, in every case. chunk: rows per forward (`coalition_measures`).
    """
    n = n_units(model, unit)
    if num_permutations is None:
        if (1 << n) > max_coalitions:
            raise MetricError(
                f"exact Shapley values of {n} units need 2**{n} = {1 << n:,} "
                f"coalitions, more than max_coalitions={max_coalitions:,}; pass "
                "num_permutations for an estimate (or raise max_coalitions)"
            )
        values, total = _exact_shapley(model, batches, unit, measure, n, chunk)
        return Scores(
            f"shapley_{measure_name(measure)}",
            unit,
            values,
            {
                "stderr": np.zeros(n),
                "exact": True,
                "coalitions": 1 << n,
                "v_all_minus_v_none": total,
            },
        )
    if not isinstance(num_permutations, (int, np.integer)) or num_permutations < 1:
        raise MetricError(
            f"num_permutations must be a positive integer or None, got {num_permutations!r}"
        )
    key = jax.random.key(0) if key is None else key
    perms = _permutations(n, int(num_permutations), key, antithetic)  # [P, n]
    P = len(perms)
    keep = np.zeros((P, n + 1, n), np.int8)  # prefix coalitions
    for p, perm in enumerate(perms):
        for j, u in enumerate(perm):
            keep[p, j + 1 :, u] = 1
    m = _unique_measures(
        model, batches, unit, keep.reshape(-1, n), measure, f"shapley {unit}", chunk
    ).reshape(P, n + 1)
    marginal = np.zeros((P, n))
    marginal[np.arange(P)[:, None], perms] = m[:, :-1] - m[:, 1:]
    values = marginal.mean(0)
    samples = 0.5 * (marginal[: P // 2] + marginal[P // 2 :]) if antithetic else marginal
    stderr = (
        samples.std(0, ddof=1) / math.sqrt(len(samples)) if len(samples) > 1 else np.full(n, np.nan)
    )
    return Scores(
        f"shapley_{measure_name(measure)}",
        unit,
        values,
        {
            "stderr": stderr,
            "exact": False,
            "permutations": P,
            "antithetic": antithetic,
            "v_all_minus_v_none": float(m[0, 0] - m[0, -1]),
        },
    )


def present_minus_absent(
    model: DepthModel,
    batches=None,
    unit: str = "block",
    num_samples: int = 32,
    key=None,
    measure="loss",
) -> Scores:
    """mean v(S) over sampled coalitions containing a unit minus the mean over those
    without it, v = -measure, coalitions = the full set, every leave-one-out set and
    `num_samples` random halves (the estimator of prior depth-pruning work; not Shapley)."""
    n = n_units(model, unit)
    key = jax.random.key(0) if key is None else key
    halves = np.asarray(
        jax.vmap(lambda k: jax.random.permutation(k, n) < n // 2)(
            jax.random.split(key, num_samples)
        ),
        np.int8,
    )
    keep = np.vstack([np.ones((1, n), np.int8), 1 - np.eye(n, dtype=np.int8), halves])
    v = -_unique_measures(model, batches, unit, keep, measure, f"present-minus-absent {unit}")
    present = np.array([v[keep[:, i] == 1].mean() for i in range(n)])
    absent = np.array([v[keep[:, i] == 0].mean() for i in range(n)])
    return Scores(
        f"present_minus_absent_{measure_name(measure)}",
        unit,
        present - absent,
        {"coalitions": len(keep)},
    )


def removal_curve(
    model: DepthModel,
    batches,
    scores,
    max_units: int | None = None,
    unit: str | None = None,
    measure="loss",
) -> np.ndarray:
    """Measure after removing k = 0..max_units units, least important first by `scores`
    (ties broken by position); all k evaluated as programs in one compiled call."""
    unit = unit or getattr(scores, "unit", None)
    values = np.asarray(scores, np.float64)
    n = n_units(model, unit)
    if values.shape != (n,):
        raise MetricError(f"scores for unit={unit!r} must have {n} values, got {values.shape}")
    K = n - 1 if max_units is None else max_units
    if not 0 <= K < n:
        raise MetricError(f"max_units must be in 0..{n - 1}, got {K}")
    order = np.argsort(values, kind="stable")
    keep = np.ones((K + 1, n), np.int8)
    for k in range(1, K + 1):
        keep[k:, order[k - 1]] = 0
    return coalition_measures(
        model, batches, unit, keep, measure, f"removal curve {getattr(scores, 'name', '')}".rstrip()
    )
