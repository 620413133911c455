"""The one evaluator of a batch of programs on the same block table: every measure (the
next-token loss, logit and hidden-state distances, and the tasks of depthjax.eval) is a
`Reduction` of each program's output, the logits [B, T, V] or the final hidden states
[B, T, D], and reaches the programs through `evaluate`.

Two strategies, and `strategy="auto"` takes the one that computes fewer FLOPs
(`evaluation_costs`):

* "batched" (`batched_reduce`): chunks of programs `vmap`-ed. Programs that differ only
  in their gates gather each table row once per step for the whole chunk (one wider
  matmul); under vmap a gated-off sublayer is selected away, not skipped, so every
  program costs a forward.
* "prefix" (`prefix_reduce`): one program after another, each starting from the model's
  own residual at the first step where it differs (taken from one traced forward of the
  model's own program), and skipping its gated-off sublayers at run time. All n
  leave-one-out ablations then cost about (n + 1) / 2 forwards. Needs programs of the
  model's depth.

A reduction may read the model's own output on the same batch (`Reduction.full`): the
prefix strategy has it from its traced forward, the batched one runs it once per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

from ..core.flops import sublayer_flops_per_token
from ..core.model import DepthModel, apply, default_positions, output_head
from ..core.program import Program, map_programs, share_structure
from ..core.walk import run_blocks
from .scores import MetricError

STRATEGIES = ("auto", "batched", "prefix")
OUTPUTS = ("logits", "hidden")


@dataclasses.dataclass(frozen=True)
class Reduction:
    """What a measure reads of each program: fn(out, full, tokens_BT, mask_BT, aux,
    **options) -> a pytree of arrays (sums over the batch, or per-row values).

    out is the program's output ("logits" float32 [B, T, V], or "hidden" [B, T, D] after
    the final norm); full the model's own output of the same kind when `full` is True, else
    None; aux the caller's per-batch arrays (targets, reference embeddings). Hashable and
    compared by value (a jit static argument): fn is a module-level function and options a
    tuple of (name, value) pairs, so equal reductions share one compile."""

    fn: Callable
    output: str = "logits"
    full: bool = False
    options: tuple = ()

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise MetricError(f"a reduction reads one of {OUTPUTS}, got {self.output!r}")

    def __call__(self, out, full, tokens_BT, mask_BT, aux):
        return self.fn(out, full, tokens_BT, mask_BT, aux, **dict(self.options))


def chunk_size(K: int, tokens_shape, cfg, output: str = "logits") -> int:
    """Programs evaluated at once: bounded so each chunk's activations stay near 256 MiB."""
    B, T = tokens_shape
    width = 8 * cfg.d_model + (cfg.vocab_size if output == "logits" else 0)
    return int(max(1, min(K, (256 << 20) // (B * T * width * 4))))


def prefix_starts(program: Program, programs: Program) -> np.ndarray:
    """int32 [K]: the step each of `programs` [K, depth] starts at, from `program`'s own
    residual there: its first step that differs (block, gates or parallel flag), moved
    back to the start of that parallel group (depth when nothing differs: only the head
    runs)."""
    own = jax.tree.map(np.asarray, program)
    differs = (
        (np.asarray(programs.block) != own.block)
        | (np.asarray(programs.attn) != own.attn)
        | (np.asarray(programs.mlp) != own.mlp)
        | (np.asarray(programs.parallel) != own.parallel)
    )
    S = differs.shape[1]
    first = np.where(differs.any(1), differs.argmax(1), S)
    group_start = np.maximum.accumulate(np.where(~own.parallel.astype(bool), np.arange(S), 0))
    return np.where(first < S, group_start[np.minimum(first, S - 1)], S).astype(np.int32)


def evaluation_costs(
    model: DepthModel, programs: Program, seq_len: int, reduction: Reduction | None = None
) -> dict[str, float]:
    """Forward FLOPs per token of evaluating `programs` [K, depth] with each strategy
    (prefix: inf when the programs' depth is not the model's). The head (the projection
    onto the vocabulary) counts only where the reduction reads logits (None: logits, no
    full output)."""
    reduction = reduction or Reduction(None)
    f = sublayer_flops_per_token(model.config, seq_len)
    head = f["head"] if reduction.output == "logits" else 0.0
    attn_KS, mlp_KS = np.asarray(programs.attn), np.asarray(programs.mlp)
    K, S = attn_KS.shape
    own = model.program
    full = (
        np.count_nonzero(np.asarray(own.attn)) * f["attn"]
        + np.count_nonzero(np.asarray(own.mlp)) * f["mlp"]
        + head
    )
    batched = K * (S * (f["attn"] + f["mlp"]) + head) + (full if reduction.full else 0.0)
    if S != model.depth:
        return {"batched": float(batched), "prefix": float("inf")}
    after = np.arange(S)[None] >= prefix_starts(own, programs)[:, None]
    computed = np.sum(after * ((attn_KS != 0) * f["attn"] + (mlp_KS != 0) * f["mlp"]))
    return {"batched": float(batched), "prefix": float(full + computed + K * head)}


def choose(
    strategy: str, model: DepthModel, programs: Program, seq_len: int, reduction: Reduction
) -> str:
    """ "batched" or "prefix": `strategy` checked, "auto" resolved by `evaluation_costs`."""
    if strategy not in STRATEGIES:
        raise MetricError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "prefix" and np.shape(programs.block)[-1] != model.depth:
        raise MetricError(
            f"strategy='prefix' starts each program from the model's own residual, so the "
            f"programs need its depth {model.depth}; got depth {np.shape(programs.block)[-1]}"
        )
    if strategy != "auto":
        return strategy
    costs = evaluation_costs(model, programs, seq_len, reduction)
    return min(costs, key=costs.get)


@functools.partial(jax.jit, static_argnames=("reduction", "chunk"))
def batched_reduce(model, programs, tokens_BT, mask_BT, aux, *, reduction, chunk):
    """[K, ...] reduction of each program's output: chunks of programs vmapped."""
    run = lambda m: apply(m, tokens_BT, mask=mask_BT, output=reduction.output)
    full = run(model) if reduction.full else None

    def one(program):
        return reduction(run(model.replace(program=program)), full, tokens_BT, mask_BT, aux)

    return map_programs(one, programs, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("reduction",))
def prefix_reduce(model, programs, start_K, tokens_BT, mask_BT, aux, *, reduction):
    """[K, ...] reduction of each program's output: program k runs from step start_K[k]
    on the model's own residual there, skipping its gated-off sublayers (one at a time)."""
    cfg, params = model.config, model.params
    full, trace = apply(model, tokens_BT, mask=mask_BT, trace=True, output=reduction.output)
    positions_BT = default_positions(tokens_BT)

    def one(xs):
        program, start = xs
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
        out = output_head(cfg, params, x_BTD, logits=reduction.output == "logits")
        return reduction(out, full, tokens_BT, mask_BT, aux)

    return jax.lax.map(one, (programs, start_K))


def evaluate(
    model: DepthModel,
    programs: Program,
    tokens_BT,
    mask_BT,
    reduction: Reduction,
    aux=None,
    *,
    strategy: str = "auto",
):
    """[K, ...] `reduction` of each of `programs` [K, depth] (on the model's table) on one
    batch of tokens int32 [B, T] (mask_BT: 1 = real token, or None), by `strategy`."""
    strategy = choose(strategy, model, programs, tokens_BT.shape[1], reduction)
    if strategy == "prefix":
        start = prefix_starts(model.program, programs)
        return prefix_reduce(model, programs, start, tokens_BT, mask_BT, aux, reduction=reduction)
    chunk = chunk_size(programs.block.shape[0], tokens_BT.shape, model.config, reduction.output)
    return batched_reduce(
        model,
        share_structure(programs),  # gate-only batches share each gathered row
        tokens_BT,
        mask_BT,
        aux,
        reduction=reduction,
        chunk=chunk,
    )
