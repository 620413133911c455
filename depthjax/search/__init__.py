"""Program search: the best depth program under a budget, for a model or per input.

Because a program is data, every candidate of a generation runs through one compiled
forward (programs of different depths pad with gated-off steps, which are exact no-ops).

    res = dj.search.run(model, "loss", batches=batches, budget=6, strategy="beam")
    res.best.score, res.best.cost, res.best.model()    # the best program within budget
    res.pareto()                                       # score vs cost front
    per = dj.search.run(model, objective, per_example=True)   # a program per input row
    dj.search.run(model, dj.eval.load_task("t.jsonl"), budget=6)  # scored by a task

Modules: space (candidates and moves), budget (costs), objective (what is scored),
evaluate (batched scoring), strategies (greedy, beam, evolutionary, MCTS), result,
driver (run, rescore), router (a classifier from inputs to per-example programs).
"""

from .budget import Budget, LatencyModel, active_steps
from .driver import PRIORS, rescore, run
from .objective import Objective, TaskObjective, as_objective, logits, loss
from .result import Found, PerExampleResult, SearchResult, pareto_front
from .router import Router, fit_router, routing_gain
from .space import MOVES, Candidate, SearchError, Space
from .strategies import MCTS, STRATEGIES, Beam, Evolutionary, Greedy

__all__ = [
    "Beam",
    "Budget",
    "Candidate",
    "Evolutionary",
    "Found",
    "Greedy",
    "LatencyModel",
    "MCTS",
    "MOVES",
    "Objective",
    "PRIORS",
    "PerExampleResult",
    "Router",
    "STRATEGIES",
    "SearchError",
    "SearchResult",
    "Space",
    "TaskObjective",
    "active_steps",
    "as_objective",
    "logits",
    "fit_router",
    "loss",
    "pareto_front",
    "rescore",
    "routing_gain",
    "run",
]
