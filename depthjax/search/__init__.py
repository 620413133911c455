"""Program search: the best depth program under a budget, for a model or per input.

Because a program is data, every candidate of a generation runs through one compiled
forward (programs of different depths pad with gated-off steps, which are exact no-ops).

    res = dj.search.run(model, "loss", batches=batches, budget=6, strategy="beam")
    res.best.score, res.best.cost, res.best.model()    # the best program within budget
    res.pareto()                                       # score vs cost front
    per = dj.search.run(model, objective, per_example=True)   # a program per input row

Modules: space (candidates and moves), budget (costs), objective (what is scored),
evaluate (batched scoring), strategies (greedy, beam, evolutionary, MCTS), result,
driver (run).
"""

from .budget import Budget, LatencyModel, active_steps
from .driver import PRIORS, rescore, run
from .objective import Objective, as_objective, logits, loss
from .result import Found, PerExampleResult, SearchResult, pareto_front
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
    "STRATEGIES",
    "SearchError",
    "SearchResult",
    "Space",
    "active_steps",
    "as_objective",
    "logits",
    "loss",
    "pareto_front",
    "rescore",
    "run",
]
