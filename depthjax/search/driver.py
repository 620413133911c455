"""`dj.search.run`: a strategy over the move space, every generation scored as one batch."""

from __future__ import annotations

import time

import jax
import numpy as np

from .. import progress
from ..core.loss import loss_measure, require_causal
from ..core.model import DepthModel
from ..depth.edit import selected_parallel
from ..metrics.gates import gate_derivatives, taylor_estimate
from ..metrics.scores import MetricError
from .budget import as_budget
from .evaluate import Evaluator
from .objective import Objective, TaskObjective, as_objective
from .result import Found, PerExampleResult, SearchResult
from .space import MOVES, Candidate, SearchError, Space
from .strategies import Problem, as_strategy

PRIORS = (None, "gradient", "hessian")


def _rng(key) -> np.random.Generator:
    """A numpy generator determined by a JAX key (or an int seed; None: seed 0)."""
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    return np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())


def _prior(space: Space, objective: Objective, kind):
    """Candidate -> estimated sort key of its score (smaller = better) from the gate
    gradient (and Hessian) at the start: defined for programs that only remove steps or
    sublayers of the start; None otherwise."""
    if kind not in PRIORS:
        raise SearchError(f"prior must be one of {PRIORS}, got {kind!r}")
    if kind is None:
        return None
    if isinstance(objective, TaskObjective):
        raise SearchError(
            f"prior={kind!r} estimates scores from gate derivatives of a loss on token "
            f"batches; task {objective.name!r} has none (its measure is not differentiable "
            "and its data is not token batches): search a task without a prior"
        )
    model = space.model
    measure = objective.measure if objective.differentiable else loss_measure
    if measure is loss_measure:
        require_causal(model, "the gradient prior (next-token loss)", MetricError)
    value, grad, hess = gate_derivatives(
        model, list(objective.batches), measure, hessian=kind == "hessian"
    )
    gates = np.concatenate([np.asarray(model.program.attn), np.asarray(model.program.mlp)])
    S = model.depth
    start_parallel = np.asarray(model.program.parallel)
    # A sort key (smaller = better): the objective's own when it is differentiable, else
    # the estimated loss (which then only orders candidates).
    to_key = objective.key if measure is objective.measure else (lambda v: v)

    def estimate(c: Candidate):
        steps = np.asarray(c.steps)
        if (
            np.any(np.diff(steps) <= 0)
            or tuple(selected_parallel(start_parallel, steps, np).tolist()) != c.parallel
        ):
            return None
        keep = np.zeros(2 * S)
        keep[steps], keep[S + steps] = c.attn, c.mlp
        return to_key(float(value + taylor_estimate(gates, grad, keep, hess)[0]))

    return estimate


def run(
    model: DepthModel,
    objective="loss",
    *,
    batches=None,
    budget=None,
    strategy="greedy",
    key=None,
    moves=MOVES,
    max_depth: int | None = None,
    per_example: bool = False,
    prior: str | None = None,
    chunk: int | None = None,
):
    """Search the programs reachable from `model`'s program by `moves` for the best
    score under `budget`.

    objective: "loss" (with batches=), a callable on logits (with batches=; see
        `search.logits`), a `search.Objective` (`search.loss(batches)`, ...) or a task
        from depthjax.eval (any object with `.measure(model, programs) -> [K]`, lower is
        better; scored on its own data; no per_example, no prior).
    budget: None, an int (max active steps) or a `search.Budget` (steps, FLOPs, KV bytes,
        latency, custom).
    strategy: "greedy" | "beam" | "evolutionary" | "mcts", or a configured
        `search.Greedy/Beam/Evolutionary/MCTS(...)`.
    key: a JAX key (or int) that fixes every random choice: same key, same result.
    moves: a subset of ("drop", "drop_sublayer", "repeat", "swap", "parallelize").
    max_depth: the longest program considered (default: the start's depth, + 2 when
        "repeat" is a move); every candidate pads to it, so all share one compile.
    per_example: search a program for every row of the objective's batches (scored on
        that row alone); returns a PerExampleResult.
    prior: None | "gradient" | "hessian": Taylor estimates of each candidate's score from
        the gate gradient (and Hessian) at the start, used to order and cut candidates
        (Greedy/Beam max_candidates) and as MCTS priors.

    Returns a SearchResult (ranked programs with scores and costs; `.pareto()`), or a
    PerExampleResult.
    """
    t0 = time.perf_counter()
    objective = as_objective(objective, batches)
    if getattr(objective, "measure", None) is loss_measure:
        require_causal(model, "objective 'loss'", MetricError)
    if per_example and isinstance(objective, TaskObjective):
        raise SearchError(
            f"per_example=True scores each input row alone; task {objective.name!r} "
            "measures a program over its whole data (one value per program): use 'loss' "
            "or a callable on logits with batches="
        )
    if per_example and not objective.per_row(model.config.vocab_size):
        raise SearchError(
            f"per_example=True needs an objective with one value per row; "
            f"{objective.name!r} gives one per batch"
        )
    strategy = as_strategy(strategy)
    space = Space(model, moves, max_depth)
    budget = as_budget(budget)
    start_program = space.program(space.start)
    budget = budget.resolve(model.config, start_program)
    costs: dict[Candidate, float] = {}

    def cost(c):
        if c not in costs:
            costs[c] = budget.cost_of(model.config, space.program(c))
        return costs[c]

    est = _prior(space, objective, prior)
    ev = Evaluator(space, objective, chunk=chunk)
    rng = _rng(key)
    name = type(strategy).__name__.lower()

    def found(c, scores) -> Found:
        measures = {k: v for k, v in scores.items() if k != "score"}
        feasible = budget.limit is None or cost(c) <= budget.limit * (1 + 1e-9)
        return Found(c, scores["score"], cost(c), feasible, measures, space)

    if not per_example:
        pb = Problem(space, cost, budget.limit, lambda c: ev.scores[c]["score"], objective.key, est)
        history, gens = [], 0
        with progress.bar(f"search ({name})", total=getattr(strategy, "total", None)) as bar:
            for cands in strategy.run(pb, rng):
                ev.pooled(cands)
                gens += 1
                feas = [c for c in ev.scores if pb.feasible(c)]
                best = min(feas, key=pb.rank) if feas else None
                history.append(ev.scores[best]["score"] if best else float("nan"))
                bar.advance(best=history[-1], programs=ev.evaluated)
        everything = [found(c, s) for c, s in ev.scores.items()]
        ranked = sorted(
            [f for f in everything if f.feasible], key=lambda f: (objective.key(f.score), f.cost)
        )
        return SearchResult(
            ranked,
            everything,
            found(space.start, ev.scores[space.start]),
            objective.name,
            objective.maximize,
            budget.describe(),
            budget.unit,
            name,
            ev.evaluated,
            ev.forwards,
            gens,
            time.perf_counter() - t0,
            history,
        )

    examples = [
        {k: v[r] for k, v in b.items()}
        for b in objective.batches
        for r in range(b["tokens"].shape[0])
    ]

    def score_of(e):
        return lambda c: ev.scores[(c, e)]["score"]

    problems = [
        Problem(space, cost, budget.limit, score_of(e), objective.key, est)
        for e in range(len(examples))
    ]
    seed = rng.integers(2**63)
    runs = {e: strategy.run(pb, np.random.default_rng([seed, e])) for e, pb in enumerate(problems)}
    seen: dict[int, list[Candidate]] = {e: [] for e in runs}
    pending = {e: next(g) for e, g in runs.items()}
    gens = 0
    total = getattr(strategy, "total", None)
    with progress.bar(f"search ({name}, per example)", total=total) as bar:
        while pending:
            pairs = [(c, e) for e, cands in pending.items() for c in cands]
            ev.paired(pairs, examples)
            gens += 1
            for e, cands in pending.items():
                seen[e].extend(cands)
            nxt = {}
            for e in pending:
                try:
                    nxt[e] = next(runs[e])
                except StopIteration:
                    pass
            pending = nxt
            bar.advance(examples_searching=len(pending), pairs=ev.evaluated)
    best, start = [], []
    for e, pb in enumerate(problems):
        cands = list(dict.fromkeys(seen[e]))
        start.append(found(space.start, ev.scores[(space.start, e)]))
        feas = [c for c in cands if pb.feasible(c)]
        best.append(
            found(min(feas, key=pb.rank), ev.scores[(min(feas, key=pb.rank), e)])
            if feas
            else start[-1]
        )
    return PerExampleResult(
        best,
        start,
        objective.name,
        objective.maximize,
        budget.describe(),
        name,
        ev.evaluated,
        ev.forwards,
        gens,
        time.perf_counter() - t0,
    )


def rescore(found: list[Found], objective, *, batches=None, chunk: int | None = None) -> np.ndarray:
    """Scores [K] of programs a search found on another objective (e.g. held-out data),
    all in one batch through one compiled function."""
    if not found:
        return np.zeros(0)
    spaces = {id(f._space) for f in found}
    if len(spaces) != 1:
        raise SearchError("rescore takes programs of one search (one start model)")
    space = found[0]._space
    objective = as_objective(objective, batches)
    ev = Evaluator(space, objective, chunk=chunk)
    cands = [f.candidate for f in found]
    ev.pooled(cands)
    return np.array([ev.scores[c]["score"] for c in cands])
