"""A router from inputs to per-example programs.

A per-example search (`run(..., per_example=True)`) finds each input's best program: an
oracle, since it scores every candidate on the input itself. A router predicts a program
from what the model has computed so far: a softmax classifier on the mean residual after
the first `k` steps of the start program, over the most common programs the search found
(its classes). `fit_router` labels every training example with the class program that
scores best on it (all (class, example) pairs in one batch), then trains the classifier
with optax; `Router.choose` picks programs for new inputs, and `routing_gain` measures
how much of the oracle's gain over the start program the router keeps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core.model import apply
from .evaluate import Evaluator
from .objective import Objective
from .result import PerExampleResult
from .space import Candidate, SearchError, Space


@jax.jit
def _mean_residual(model, tokens_BT, mask_BT, k):
    """Mean over real tokens of residual[k] (the input of step k) [B, D]."""
    _, trace = apply(model, tokens_BT, mask=mask_BT, trace=True)
    x = trace.residual[k].astype(jnp.float32)
    w = mask_BT[..., None]
    return jnp.sum(x * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)


def _rows(objective: Objective) -> list[dict]:
    return [
        {k: v[r] for k, v in b.items()}
        for b in objective.batches
        for r in range(b["tokens"].shape[0])
    ]


def _features(model, objective: Objective, k: int) -> np.ndarray:
    return np.concatenate(
        [np.asarray(_mean_residual(model, b["tokens"], b["mask"], k)) for b in objective.batches]
    )


def class_scores(
    space: Space, programs: list[Candidate], objective: Objective, chunk: int | None = None
) -> np.ndarray:
    """Score [N, M] of each class program on each example (one batch of pairs)."""
    rows = _rows(objective)
    ev = Evaluator(space, objective, chunk=chunk)
    pairs = [(c, e) for e in range(len(rows)) for c in programs]
    ev.paired(pairs, rows)
    return np.array([[ev.scores[(c, e)]["score"] for c in programs] for e in range(len(rows))])


@dataclasses.dataclass
class Router:
    """programs: the classes; k: features are the mean residual entering step k; w, b and
    the feature normalization (mu, sd) define the classifier."""

    programs: list[Candidate]
    k: int
    w: np.ndarray
    b: np.ndarray
    mu: np.ndarray
    sd: np.ndarray
    space: Space
    maximize: bool

    def logits(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mu) / self.sd) @ self.w + self.b

    def choose(self, objective: Objective) -> np.ndarray:
        """Class index [N] for every row of the objective's batches."""
        return self.logits(_features(self.space.model, objective, self.k)).argmax(-1)


def fit_router(
    result: PerExampleResult,
    objective: Objective,
    *,
    k: int,
    classes: int = 8,
    steps: int = 500,
    lr: float = 1e-2,
    weight_decay: float = 1e-3,
    chunk: int | None = None,
) -> Router:
    """Train a router on the examples of a per-example search (`objective` must be the
    search's, so rows line up with `result.best`)."""
    if not isinstance(result, PerExampleResult):
        raise SearchError("fit_router needs the result of run(..., per_example=True)")
    space = result.best[0]._space
    if not 0 <= k <= space.model.depth:
        raise SearchError(f"k must be in 0..{space.model.depth} (residual[k] enters step k)")
    n = sum(b["tokens"].shape[0] for b in objective.batches)
    if n != len(result):
        raise SearchError(f"the objective has {n} rows; the search had {len(result)} examples")
    programs = [c for c, _ in result.counts()[:classes]]
    if space.start not in programs:
        programs.append(space.start)  # the router may always keep the start program
    scores = class_scores(space, programs, objective, chunk)
    labels = (scores.argmax if objective.maximize else scores.argmin)(-1)
    x = _features(space.model, objective, k)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = jnp.asarray((x - mu) / sd)
    M = len(programs)
    params = {"w": jnp.zeros((x.shape[1], M)), "b": jnp.zeros(M)}
    opt = optax.adamw(lr, weight_decay=weight_decay)
    state = opt.init(params)
    y = jnp.asarray(labels)

    @jax.jit
    def step(params, state):
        def loss(p):
            lg = xn @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return Router(
        programs,
        k,
        np.asarray(params["w"]),
        np.asarray(params["b"]),
        mu,
        sd,
        space,
        objective.maximize,
    )


def routing_gain(
    router: Router,
    objective: Objective,
    oracle: PerExampleResult | None = None,
    chunk: int | None = None,
) -> dict:
    """Mean improvement over the start program on the objective's rows of: the router's
    programs, the best class program per row (class oracle), the one class program best on
    average (a single global program) and, given a per-example search on these rows, its
    oracle; plus the share of the oracle's gain the router keeps."""
    scores = class_scores(router.space, router.programs, objective, chunk)  # [N, M]
    start = scores[:, router.programs.index(router.space.start)]
    sign = 1.0 if router.maximize else -1.0
    gain = lambda s: float(np.mean(sign * (s - start)))
    chosen = router.choose(objective)
    best_class = scores.max(1) if router.maximize else scores.min(1)
    global_class = scores[:, int(np.argmax(sign * scores.mean(0)))]
    out = {
        "router": gain(scores[np.arange(len(chosen)), chosen]),
        "class oracle": gain(best_class),
        "single best program": gain(global_class),
        "classes": len(router.programs),
    }
    if oracle is not None:
        out["oracle"] = oracle.gain()
        share = out["router"] / out["oracle"] if out["oracle"] else float("nan")
        out["router share of oracle"] = share
    return out
