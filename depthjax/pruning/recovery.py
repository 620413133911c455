"""dj.recover: emulate what pruning removed, with per-step adapters in the pruned model.

The units removed from `original` form spans: runs of dropped steps, or runs of gated-off
sublayers in the order attn_0, mlp_0, attn_1, ... . Each span maps its input x (the
original residual stream where the span starts) to an update d (the residual where it
ends, minus x). An adapter fitted on calibration tokens adds g(x) ~ d where the next kept
unit reads its input: at the following step (params["steps"]["adapter"], see
depthjax.core.step_params) or before the head (params["final_adapter"]).

methods: "bias"   g(x) = mean d;
         "linear" g(x) = c + x W, W of rank r: closed-form least squares, reduced to rank r
                  along the top principal directions of the fitted values;
         "lora"   per-step LoRA of rank r on the pruned blocks, trained on the LM loss;
         "distill" the same LoRA trained to match the original program's next-token
                  distribution (KL at temperature T, optionally plus the residual stream
                  after each kept step); the teacher walks the same table.
"lora" and "distill" share one training loop (depthjax.pruning.healing) and also train the
adapters of an earlier "bias" or "linear" recovery where the pruned model has them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import progress
from ..core.loss import require_causal
from ..core.model import DepthModel, apply
from ..core.program import ProgramError
from ..errors import DepthjaxError
from ..metrics.batches import as_batches
from ..metrics.scores import MetricError
from . import healing

METHODS = ("bias", "linear", "lora", "distill")
# rank=None: what recover uses (the CLI documents the same).
DEFAULT_RANK = {"linear": 16, "lora": 8, "distill": 8}


class RecoverError(DepthjaxError):
    """Recovery arguments that do not fit the models (method, rank, a different base)."""


@dataclasses.dataclass(frozen=True)
class Span:
    """Removed units between original residual points `start` and `end`.

    A point is (step, 0) for the input of step `step` or (step, 1) for the point between
    its attention and MLP; `target` is the pruned step whose input gets the adapter
    (None: before the head)."""

    start: tuple[int, int]
    end: tuple[int, int]
    target: int | None


def _align(pruned: DepthModel, original: DepthModel) -> np.ndarray:
    """Original step of every pruned step (pruned = original with steps deleted)."""
    po, pp = original.program, pruned.program
    ob, pb = np.asarray(po.block), np.asarray(pp.block)
    same = lambda j, k: (
        pb[j] == ob[k]
        and float(pp.attn[j]) == float(po.attn[k])
        and float(pp.mlp[j]) == float(po.mlp[k])
    )
    idx, k = [], 0
    for j in range(pruned.depth):
        while k < original.depth and not same(j, k):
            k += 1
        if k == original.depth:
            raise ProgramError(
                f"pruned step {j} matches no remaining original step: recover "
                "needs a model made from `original` by dropping steps (or, at "
                "equal depth, by gating sublayers off)"
            )
        idx.append(k)
        k += 1
    return np.asarray(idx)


def find_spans(pruned: DepthModel, original: DepthModel) -> list[Span]:
    """The removed spans and where their adapters go."""
    if np.asarray(original.program.parallel).any() or np.asarray(pruned.program.parallel).any():
        raise ProgramError("recover does not support parallel groups")
    S = original.depth
    if pruned.depth < S:
        kept = _align(pruned, original)
        gone = np.setdiff1d(np.arange(S), kept)
        spans = []
        for run in np.split(gone, np.flatnonzero(np.diff(gone) != 1) + 1):
            nxt = np.flatnonzero(kept > run[-1])
            spans.append(
                Span((int(run[0]), 0), (int(run[-1]) + 1, 0), int(nxt[0]) if nxt.size else None)
            )
        return spans
    if pruned.depth != S:
        raise ProgramError(f"pruned has more steps ({pruned.depth}) than original ({S})")
    po, pp = original.program, pruned.program
    if not np.array_equal(np.asarray(po.block), np.asarray(pp.block)):
        raise ProgramError("pruned and original run different blocks at equal depth")
    # Sublayer sequence attn_0, mlp_0, attn_1, ...: removed = on in original, off in pruned.
    on_o = np.stack([np.asarray(po.attn) != 0, np.asarray(po.mlp) != 0], 1).reshape(-1)
    on_p = np.stack([np.asarray(pp.attn) != 0, np.asarray(pp.mlp) != 0], 1).reshape(-1)
    if (on_p & ~on_o).any():
        raise ProgramError("pruned switches on sublayers that are off in original")
    spans, i = [], 0
    while i < 2 * S:
        if not (on_o[i] and not on_p[i]):
            i += 1
            continue
        j = i  # extend over removed (or originally absent) sublayers
        while j + 1 < 2 * S and not on_p[j + 1]:
            j += 1
        last_removed = max(k for k in range(i, j + 1) if on_o[k] and not on_p[k])
        point = lambda k: (k // 2, k % 2)
        end = point(last_removed + 1) if last_removed + 1 < 2 * S else (S, 0)
        nxt = j + 1  # the next sublayer still on; its step's input gets the adapter
        spans.append(Span(point(i), end, nxt // 2 if nxt < 2 * S else None))
        i = j + 1
    return spans


def _point(tr, p):
    step, mid = p
    x = tr.residual[step]
    return x + tr.attn_out[step] if mid else x


@functools.partial(jax.jit, static_argnames=("spans",))
def _moment_sums(model, tokens_BT, mask_BT, spans):
    """Per span: (n, sum x, sum d, sum x x^T, sum x d^T) over real tokens."""
    _, tr = apply(model, tokens_BT, mask=mask_BT, trace=True)
    w = mask_BT.reshape(-1, 1).astype(jnp.float32)
    out = []
    for sp in spans:
        x = _point(tr, sp.start).reshape(-1, tr.residual.shape[-1]).astype(jnp.float32)
        d = _point(tr, sp.end).reshape(x.shape).astype(jnp.float32) - x
        xw = x * w
        out.append((jnp.sum(w), xw.sum(0), (d * w).sum(0), xw.T @ x, xw.T @ d))
    return out


def fit_linear(n, sx, sd, sxx, sxd, rank: int):
    """Least squares d ~ c + x W from moment sums, W reduced to `rank` (float64).
    Returns (c [D], a [D, r], b [r, D]) with W = a @ b."""
    mx, md = sx / n, sd / n
    cxx = sxx / n - np.outer(mx, mx)
    cxd = sxd / n - np.outer(mx, md)
    w = np.linalg.pinv(cxx, rcond=1e-10, hermitian=True) @ cxd  # [D, D]
    fitted_cov = w.T @ cxx @ w  # cov of x W
    _, vecs = np.linalg.eigh(fitted_cov)
    v = vecs[:, ::-1][:, :rank]  # top directions
    a, b = w @ v, v.T
    return md - mx @ a @ b, a, b


def _with_adapters(pruned: DepthModel, spans, fits) -> DepthModel:
    D, S = pruned.config.d_model, pruned.depth
    steps = dict(pruned.params.get("steps") or {})
    old = steps.get("adapter")
    if old is not None and any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(old)):
        raise ProgramError("the pruned model already has recovery adapters")
    r = max((f[1].shape[1] for f in fits if len(f) == 3), default=0)
    adapter = {"bias": np.zeros((S, D), np.float32)}
    if r:
        adapter.update(a=np.zeros((S, D, r), np.float32), b=np.zeros((S, r, D), np.float32))
    final = None
    for sp, fit in zip(spans, fits):
        c = fit[0]
        ab = (fit[1], fit[2]) if len(fit) == 3 else None
        if sp.target is None:
            final = {"bias": jnp.asarray(c, jnp.float32)}
            if ab:
                final.update(a=jnp.asarray(ab[0], jnp.float32), b=jnp.asarray(ab[1], jnp.float32))
            continue
        if np.any(adapter["bias"][sp.target]):
            raise ProgramError(f"two removed spans end at pruned step {sp.target}")
        adapter["bias"][sp.target] = c
        if ab:
            adapter["a"][sp.target, :, : ab[0].shape[1]] = ab[0]
            adapter["b"][sp.target, : ab[1].shape[0]] = ab[1]
    steps["adapter"] = jax.tree.map(jnp.asarray, adapter)
    params = {**pruned.params, "steps": steps}
    if final is not None:
        params["final_adapter"] = final
    return pruned.replace(params=params)


def recover(
    pruned: DepthModel,
    original: DepthModel,
    batches,
    method: str = "bias",
    rank: int | None = None,
    *,
    lora_steps: int = 100,
    learning_rate: float = 1e-3,
    temperature: float | None = None,
    hidden: float | None = None,
    key=None,
    log_every: int = 0,
) -> DepthModel:
    """The pruned model with lightweight adapters emulating the removed units (see module
    docstring). `batches` are calibration tokens (any iterable metrics accept).

    rank: of the linear map or the LoRA; None takes DEFAULT_RANK (16 linear, capped at
    d_model; 8 LoRA and distill). lora_steps, learning_rate, key (LoRA init; default
    key(0)): the Adam training of "lora" and "distill", cycling through the batches.
    temperature (default 1.0, > 0) and hidden (default 0.0: logits only; >= 0, the
    weight of the residual-stream MSE): "distill" only."""
    if method not in METHODS:
        raise RecoverError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    for name, value in (("temperature", temperature), ("hidden", hidden)):
        if value is not None and method != "distill":
            raise RecoverError(f"{name}= applies to method='distill' only, not {method!r}")
    _check_same_model(pruned, original)
    if rank is None and method != "bias":
        rank = min(DEFAULT_RANK[method], original.config.d_model)
    if method in ("lora", "distill"):
        options = dict(
            temperature=healing.DEFAULT_TEMPERATURE if temperature is None else temperature,
            hidden=healing.DEFAULT_HIDDEN if hidden is None else hidden,
        )
        return _heal(
            method,
            pruned,
            original,
            batches,
            rank,
            lora_steps,
            learning_rate,
            key,
            log_every,
            **options,
        )
    if method == "linear" and (
        isinstance(rank, bool)
        or not isinstance(rank, (int, np.integer))
        or not 1 <= rank <= original.config.d_model
    ):
        raise RecoverError(
            f"method='linear' needs rank in 1..{original.config.d_model}, got {rank!r}"
        )
    spans = find_spans(pruned, original)
    if not spans:
        raise ProgramError("nothing was removed from `original`: no spans to recover")
    total = None
    for b in progress.track(
        as_batches(batches, original.config.vocab_size), f"recover {method}: moments"
    ):
        sums = _moment_sums(original, b.tokens, b.mask, tuple(spans))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    fits = []
    for n, sx, sd, sxx, sxd in jax.tree.map(lambda a: np.asarray(a, np.float64), total):
        fits.append((sd / n,) if method == "bias" else fit_linear(n, sx, sd, sxx, sxd, rank))
    return _with_adapters(pruned, spans, fits)


def _check_same_model(pruned: DepthModel, original: DepthModel) -> None:
    """`pruned` must come from `original`: the same config up to the number of rows."""
    a, b = pruned.config, original.config.replace(n_layers=pruned.config.n_layers)
    if a != b:
        diff = [
            f"{k} {getattr(original.config, k)!r} (original) vs {getattr(a, k)!r} (pruned)"
            for k in a.to_dict()
            if k != "n_layers" and getattr(a, k) != getattr(b, k)
        ]
        raise RecoverError(
            "recover needs `original` to be the model `pruned` was made from; "
            "their configs differ: " + "; ".join(diff[:4])
        )


def _real(name: str, value, low: float, inclusive: bool) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and np.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        raise RecoverError(
            f"{name} must be a finite number {'>=' if inclusive else '>'} {low}, got {value!r}"
        )
    return float(value)


def kept_steps(pruned: DepthModel, original: DepthModel) -> np.ndarray:
    """Original step of every pruned step: `_align` after dropping steps, the same step
    when sublayers were gated off at equal depth. int [pruned.depth]."""
    find_spans(pruned, original)  # refuses what recover cannot align
    return _align(pruned, original) if pruned.depth < original.depth else np.arange(pruned.depth)


def _check_same_table(pruned: DepthModel, original: DepthModel) -> None:
    """distill runs original's program on pruned's table and shared parameters (one copy of
    the weights): they must hold the same values."""
    shared = lambda m: {k: v for k, v in m.params.items() if k not in ("steps", "final_adapter")}
    a, b = shared(pruned), shared(original)
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise RecoverError(
            "method='distill' walks pruned's block table with original's program, but their "
            "parameter trees differ (a compacted or re-quantized table?)"
        )
    differ = [
        jax.tree_util.keystr(path)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b))
        if x is not y and (x.shape != y.shape or not bool(jnp.array_equal(x, y)))
    ]
    if differ:
        raise RecoverError(
            "method='distill' walks pruned's block table with original's program (one copy "
            "of the weights), so their shared parameters must be equal; these differ: "
            + ", ".join(differ[:4])
        )


def _heal(
    method,
    pruned,
    original,
    batches,
    rank,
    steps,
    learning_rate,
    key,
    log_every,
    *,
    temperature,
    hidden,
):
    """Per-step LoRA (healing.init_lora), plus the adapters pruned already has, trained
    alone with Adam on the LM loss ("lora") or on the distillation loss ("distill")."""
    require_causal(pruned, f"method={method!r}", MetricError)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise RecoverError(f"method={method!r} needs a positive integer rank, got {rank!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise RecoverError(f"lora_steps must be a positive integer, got {steps!r}")
    learning_rate = _real("learning_rate", learning_rate, 0.0, inclusive=False)
    data = as_batches(batches, pruned.config.vocab_size)
    key = jax.random.key(0) if key is None else key
    trainable = {"lora": healing.init_lora(pruned, rank, key)}
    if "adapter" in (pruned.params.get("steps") or {}):
        trainable["adapter"] = pruned.params["steps"]["adapter"]
    if "final_adapter" in pruned.params:
        trainable["final_adapter"] = pruned.params["final_adapter"]
    if method == "lora":
        objective, teacher = healing.lm_objective, None
    else:
        temperature = _real("temperature", temperature, 0.0, inclusive=False)
        hidden = _real("hidden", hidden, 0.0, inclusive=True)
        kept = kept_steps(pruned, original)
        _check_same_table(pruned, original)
        objective = functools.partial(
            healing.distill_objective, temperature=temperature, hidden=hidden, kept=kept
        )
        own = ("steps", "final_adapter")  # the teacher's per-step parameters, if any
        teacher = {
            "program": original.program,
            "params": {k: original.params[k] for k in own if original.params.get(k) is not None},
        }
    return healing.train(
        pruned,
        trainable,
        objective,
        teacher,
        data,
        steps=int(steps),
        learning_rate=learning_rate,
        label=f"recover {method}",
        log_every=log_every,
    )
