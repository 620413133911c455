"""Metrics that evaluate the model with sets of units switched off: leave-one-out
ablation, Shapley values (exact from all coalitions, or antithetic Monte Carlo), the
present-minus-absent estimator and removal curves.

Every coalition is a *program* (the unit's gates set to 0) that differs from the model's
own only in its gates, so all coalitions of a call go through one compiled function and
no weights are copied per coalition. They are evaluated by depthjax.metrics.strategies:
"batched" (chunks of coalitions vmapped over their gates) or "prefix" (each coalition
from the model's own residual at its first switched-off unit, gated-off sublayers
skipped: all n leave-one-out ablations cost about (n + 1) / 2 forwards); `strategy="auto"`
takes the one with fewer FLOPs. Memory does not grow with the number of coalitions
beyond a chunk's activations. The measure of each coalition is accumulated over batches
on device.

A unit is a step ("block": both gates), an attention or MLP sublayer ("attn", "mlp"), or
any sublayer ("sublayer": attn_0..attn_{S-1}, mlp_0..mlp_{S-1}, ranked jointly).
The measure of a coalition is one of `MEASURES`:

* "loss": its next-token loss (causal models);
* "logit": the mean L2 distance of its logits [V] to the full model's, per real token
  (causal models: an encoder has no LM head, and dj.apply's logits for one are its
  hidden states times the word embeddings, a projection the encoder never makes, which
  costs more than its blocks; refused by name rather than silently read as hidden
  states, so "ablation_logit" always means logits);
* "hidden": the mean L2 distance of its final hidden states [D] (after the final norm)
  to the full model's, per real token (any model; the head is not run);
* a task: any object with `measure(model, programs) -> [K]` and a `name`, e.g. a
  depthjax.eval task: 1 - accuracy, perplexity, or 1 - the representation cosine for
  encoders. The tasks of depthjax.eval (but not ExactMatch, which decodes) evaluate
  their programs through the same strategies and take `strategy=`.

Lower is better, and a unit's value is how much the measure rises without it. With a
task, `batches` may be None: the task has its data.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import progress
from ..core.loss import nll_sums, require_causal
from ..core.model import DepthModel
from ..core.program import Program
from .batches import as_batches, row_chunks
from .scores import MetricError, Scores
from .strategies import STRATEGIES, Reduction, choose, evaluate


def _loss_sums(out, full, tokens_BT, mask_BT, aux):
    return nll_sums(out, tokens_BT, mask_BT)


def _distance_sums(out, full, tokens_BT, mask_BT, aux):
    """(sum over real tokens of ||out - full||, their count): logits or hidden states."""
    dist_BT = jnp.linalg.norm(out.astype(jnp.float32) - full.astype(jnp.float32), axis=-1)
    return jnp.sum(dist_BT * mask_BT), jnp.sum(mask_BT)


MEASURE_REDUCTIONS = {
    "loss": Reduction(_loss_sums, "logits"),
    "logit": Reduction(_distance_sums, "logits", full=True),
    "hidden": Reduction(_distance_sums, "hidden", full=True),
}
MEASURES = tuple(MEASURE_REDUCTIONS)


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
    tile = lambda a: np.broadcast_to(np.asarray(a), attn.shape)  # host arrays: checked there
    p = model.program
    return Program(block=tile(p.block), attn=attn, mlp=mlp, parallel=tile(p.parallel))


def is_task(measure) -> bool:
    """Whether `measure` is a task object (it measures programs itself)."""
    return callable(getattr(measure, "measure", None))


def measure_name(measure) -> str:
    return measure.name if is_task(measure) else measure


def _task_measures(model, task, programs, strategy):
    """[K] `task.measure(model, programs)`, passing `strategy` on when it is not "auto"
    (the tasks of depthjax.eval take it; a task of its own may not)."""
    options = {}
    if strategy != "auto":
        if "strategy" not in inspect.signature(task.measure).parameters:
            raise MetricError(
                f"task {measure_name(task)!r} evaluates its programs itself and takes no "
                f"strategy=; leave strategy='auto' (got {strategy!r})"
            )
        options["strategy"] = strategy
    values = np.asarray(task.measure(model, programs, **options), np.float64)
    if values.shape != (programs.block.shape[0],):
        raise MetricError(
            f"task {measure_name(task)!r} returned {values.shape} values "
            f"for {programs.block.shape[0]} programs"
        )
    return values


def require_logits(model: DepthModel) -> None:
    """measure="logit" needs an LM head: an encoder's is refused by name (see MEASURES)."""
    if not model.config.causal:
        raise MetricError(
            f"measure='logit' compares next-token logits, and a bidirectional "
            f"{model.config.family} encoder has no LM head (its 'logits' would be the hidden "
            "states times the word embeddings, a projection the encoder never makes); use "
            "measure='hidden' (the same distance on the final hidden states) or a "
            "representation task (depthjax.eval.Representation)"
        )


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
    strategy: "batched", "prefix" or "auto" (fewer FLOPs; depthjax.metrics.strategies),
    for every measure (a task: see `MEASURES`).

    chunk: rows per forward (None: each batch whole). A forward then holds, for `chunk`
    rows of T tokens, the outputs of a few programs and (strategy "prefix") the model's
    [depth+1, chunk, T, D] residual stack; attention is blockwise when T * T > 4 *
    `ModelConfig.attention_chunk` ** 2, so memory is linear in T."""
    if strategy not in STRATEGIES:
        raise MetricError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    programs = programs_for(model, unit, keep)
    if is_task(measure):
        return _task_measures(model, measure, programs, strategy)
    if measure not in MEASURES:
        raise MetricError(
            f"measure must be one of {MEASURES} or a task (an object with "
            f".measure(model, programs)), got {measure!r}"
        )
    if measure == "loss":
        require_causal(model, "measure='loss'", MetricError)
    if measure == "logit":
        require_logits(model)
    reduction = MEASURE_REDUCTIONS[measure]
    data = row_chunks(as_batches(batches, model.config.vocab_size), chunk)
    strategy = choose(strategy, model, programs, data[0].tokens.shape[1], reduction)
    total = weight = 0.0
    for b in progress.track(data, f"{description} ({len(keep)} programs, {strategy})"):
        s, w = evaluate(model, programs, b.tokens, b.mask, reduction, strategy=strategy)
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
