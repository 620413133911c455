"""Scoring candidates: every generation of a search goes through one compiled function.

Candidates are packed as arrays [K, max_depth] (see `Space.pack`), so programs of any
depth up to max_depth share one compile: shorter ones are padded with gated-off steps,
which add exactly 0. The compiled function scores a chunk of C programs at once (a
`vmap` over programs); chunks of a generation are dispatched back to back and summed on
device, and the host reads the sums once per generation.

Two layouts: pooled (every program on every row of every batch: a search for the whole
data) and paired (program k on row k only: per-example search, where each example has
its own candidates). A task objective is pooled through the task's own batched scoring
(`task_scores`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel, apply
from ..core.program import Program
from ..metrics.strategies import chunk_size
from .objective import Objective, TaskObjective
from .space import Candidate, SearchError, Space


def candidate_model(model: DepthModel, c: dict) -> DepthModel:
    """The start model running packed candidate c (arrays [L]; traceable)."""
    p, s = model.program, c["steps"]
    program = Program(
        block=p.block[s],
        attn=p.attn[s] * c["attn"],
        mlp=p.mlp[s] * c["mlp"],
        parallel=c["parallel"],
    )
    params = dict(model.params)
    if "steps" in params:
        steps = jax.tree.map(lambda a: a[s], params["steps"])
        if "adapter" in steps:  # a padding step must add nothing, its adapter included
            steps["adapter"] = jax.tree.map(
                lambda a: a * c["real"].reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype),
                steps["adapter"],
            )
        params["steps"] = steps
    return model.replace(params=params, program=program)


@functools.partial(jax.jit, static_argnames=("measure",))
def pooled_sums(model, cands, batch, *, measure):
    """{key: [C]} sums of the measure of every candidate over the batch's rows."""

    def one(c):
        logits = apply(candidate_model(model, c), batch["tokens"], mask=batch["mask"])
        return {k: jnp.sum(v) for k, v in measure(logits, batch).items()}

    return jax.vmap(one)(cands)


@functools.partial(jax.jit, static_argnames=("measure",))
def _paired(model, cands, rows, *, measure):
    """{key: [C]} measure of candidate k on row k alone."""

    def one(c, row):
        b = jax.tree.map(lambda a: a[None], row)
        logits = apply(candidate_model(model, c), b["tokens"], mask=b["mask"])
        return {k: v[0] for k, v in measure(logits, b).items()}

    return jax.vmap(one)(cands, rows)


def _chunks(arrays: dict, C: int):
    """Slices of C rows; the last one padded with copies of row 0 (results dropped)."""
    K = len(next(iter(arrays.values())))
    for i in range(0, K, C):
        part = {k: v[i : i + C] for k, v in arrays.items()}
        n = len(next(iter(part.values())))
        if n < C:
            part = {k: np.concatenate([v, np.repeat(v[:1], C - n, 0)]) for k, v in part.items()}
        yield n, part


def alone_task(task, model: DepthModel):
    """The task to measure candidate models alone by: `task`, or a copy of it whose reference
    is the start `model` where the task compares a program to its own model's output
    (Representation without reference=), so that each candidate compares to the start."""
    if getattr(task, "reference", False) is None and dataclasses.is_dataclass(task):
        return dataclasses.replace(task, reference=model)
    return task


def task_scores(space: Space, task, cands: list[Candidate], chunk: int) -> np.ndarray:
    """[K] `task.measure` of each candidate (lower is better).

    Candidates are padded programs on the start model's table: `task.measure(model,
    programs)` takes them `chunk` at a time as one [chunk, max_depth] batch (the last chunk
    padded with copies of its first program), so every call reuses the task's compiles.
    Per-step parameters (params["steps"]) must travel with their steps, which a batch of
    programs on one model cannot do: then `task.measure(candidate model, None)` scores
    each candidate alone (one compile per depth; pass `alone_task(task, model)`)."""
    model, name = space.model, getattr(task, "name", type(task).__name__)

    def checked(values, k: int) -> np.ndarray:
        values = np.asarray(values, np.float64)
        if values.shape != (k,):
            raise SearchError(
                f"task {name!r} returned values of shape {values.shape} for {k} programs; "
                "task.measure(model, programs) must give one value per program"
            )
        return values

    if model.params.get("steps"):
        return np.array([checked(task.measure(space.to_model(c), None), 1)[0] for c in cands])
    out = []
    for n, part in _chunks(space.pack(cands), chunk):
        programs = candidate_model(model, part).program  # [chunk, max_depth]
        out.append(checked(task.measure(model, programs), chunk)[:n])
    return np.concatenate(out)


class Evaluator:
    """Scores candidates (pooled, or paired with examples) and remembers every score.

    `scores[c]` (pooled) or `scores[(c, e)]` (paired) is a dict of the objective's outputs
    as means (score / weight). `evaluated` counts distinct programs scored, `forwards` the
    (program, batch-row) forwards run, padding excluded.
    """

    def __init__(self, space: Space, objective: Objective, *, chunk: int | None = None):
        self.space, self.objective = space, objective
        self.scores: dict = {}
        self.evaluated = 0
        self.forwards = 0
        typical = -(-max(len(space.neighbours(space.start)), 1) // 8) * 8
        on_cpu = jax.default_backend() == "cpu"
        if isinstance(objective, TaskObjective):  # the task bounds its own memory
            self.chunk = chunk or (4 if on_cpu else typical)
            self.task = alone_task(objective.task, space.model)
            return
        # One chunk size for the whole search, so every generation reuses one compile. On an
        # accelerator: the start's neighbourhood (a generation's typical size) rounded up to
        # a multiple of 8, within the memory bound. On CPU, wider batches of programs are no
        # faster per program (benchmarks/search.py), so chunks stay small: less padding.
        cfg, tokens = space.model.config, objective.batches[0]["tokens"]
        self.chunk = chunk or min(4 if on_cpu else typical, chunk_size(1 << 30, tokens.shape, cfg))
        self.paired_chunk = chunk or min(
            16 if on_cpu else 4 * typical, chunk_size(1 << 30, (1, tokens.shape[1]), cfg)
        )

    def _means(self, sums: dict, idx) -> dict:
        w = sums["weight"][idx]
        return {
            k: float(v[idx] / w) if w else float("nan") for k, v in sums.items() if k != "weight"
        }

    def pooled(self, cands: list[Candidate]) -> None:
        """Score the new candidates among `cands` on all of the objective's data."""
        new = list(dict.fromkeys(c for c in cands if c not in self.scores))
        if not new:
            return
        if isinstance(self.objective, TaskObjective):
            values = task_scores(self.space, self.task, new, self.chunk)
            self.scores.update({c: {"score": float(v)} for c, v in zip(new, values)})
            self.evaluated += len(new)
            self.forwards += len(new)  # one pass over the task's data each
            return
        packed = self.space.pack(new)
        C = self.chunk
        sums = []
        for n, part in _chunks(packed, C):
            acc = None
            for batch in self.objective.batches:
                out = pooled_sums(self.space.model, part, batch, measure=self.objective.measure)
                acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
            sums.append((n, acc))
        total = {
            k: np.concatenate([np.asarray(a[k], np.float64)[:n] for n, a in sums])
            for k in sums[0][1]
        }
        rows = sum(b["tokens"].shape[0] for b in self.objective.batches)
        for k, c in enumerate(new):
            self.scores[c] = self._means(total, k)
        self.evaluated += len(new)
        self.forwards += len(new) * rows

    def paired(self, pairs: list[tuple[Candidate, int]], examples: list[dict]) -> None:
        """Score (candidate, example) pairs: examples[e] is one row (arrays without the
        batch axis); rows of one length are scored together."""
        new = list(dict.fromkeys(p for p in pairs if p not in self.scores))
        if not new:
            return
        by_len: dict[int, list] = {}
        for p in new:
            by_len.setdefault(examples[p[1]]["tokens"].shape[0], []).append(p)
        groups = []
        for group in by_len.values():
            packed = self.space.pack([c for c, _ in group])
            packed.update(
                {
                    f"row:{k}": np.stack([examples[e][k] for _, e in group])
                    for k in examples[group[0][1]]
                }
            )
            groups.append((group, list(_chunks(packed, self.paired_chunk))))
        for group, parts in groups:
            sums = []
            for n, part in parts:
                cands = {k: v for k, v in part.items() if not k.startswith("row:")}
                rows = {k[4:]: v for k, v in part.items() if k.startswith("row:")}
                sums.append(
                    (n, _paired(self.space.model, cands, rows, measure=self.objective.measure))
                )
            total = {
                k: np.concatenate([np.asarray(a[k], np.float64)[:n] for n, a in sums])
                for k in sums[0][1]
            }
            for k, p in enumerate(group):
                self.scores[p] = self._means(total, k)
        self.evaluated += len(new)
        self.forwards += len(new)
