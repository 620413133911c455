"""Search strategies. Each is a generator over one search problem: it yields a generation
(a list of candidates to score), the driver scores all of them in one batch, and the
generator reads the scores through its `Problem` before it proposes the next generation.
Per-example search runs one generator per example in lockstep and scores every
example's generation together.

    Greedy(): from the start, move to the best neighbour while that improves (the
        block-pruning baseline when the start is over budget: drop the unit whose
        removal hurts least, until the program fits).
    Beam(width): keep the `width` best programs; their neighbours form a generation.
    Evolutionary(population, generations): (mu + lambda) selection; children are parents
        (chosen by tournament) after 1..max_mutations random moves (geometric: mostly 1).
    MCTS(simulations, batch): UCT tree search over moves with priors (PUCT; Dirichlet
        noise at the root), a batch of leaves per generation (virtual loss keeps them
        distinct); as in the chain-of-layers search of "Skip a Layer or Loop it?".

Greedy and Beam are deterministic; Evolutionary and MCTS draw from the key.

Feasibility: from a program within budget only moves that stay within budget are taken;
from one over budget only moves that lower the cost, so every strategy descends into the
budget and then searches inside it. Programs rank feasible first, then by score, then by
lower cost (so ties go to the cheaper program).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from .space import Candidate, SearchError, Space


class Problem:
    """One search: the space, costs and feasibility, the score of evaluated candidates,
    and an optional prior: candidate -> estimated sort key (smaller = better) or None."""

    def __init__(
        self,
        space: Space,
        cost: Callable[[Candidate], float],
        limit: float | None,
        score: Callable[[Candidate], float],
        key: Callable[[float], float],
        prior: Callable[[Candidate], float | None] | None = None,
    ):
        self.space, self.cost, self.limit = space, cost, limit
        self.score, self.key, self.prior = score, key, prior
        self._nbrs: dict[Candidate, list[Candidate]] = {}

    def feasible(self, c: Candidate) -> bool:
        return self.limit is None or self.cost(c) <= self.limit * (1 + 1e-9)

    def rank(self, c: Candidate) -> tuple:
        return (not self.feasible(c), self.key(self.score(c)), self.cost(c))

    def allowed(self, c: Candidate) -> list[Candidate]:
        """Neighbours of c that a search may move to (see the module docstring)."""
        if c not in self._nbrs:
            nbrs = self.space.neighbours(c)
            if self.feasible(c):
                nbrs = [n for n in nbrs if self.feasible(n)]
            else:
                here = self.cost(c)
                nbrs = [n for n in nbrs if self.cost(n) < here]
            self._nbrs[c] = nbrs
        return self._nbrs[c]

    def prior_key(self, c: Candidate) -> float:
        """Estimated sort key of c's score (smaller = better; nan without an estimate)."""
        est = self.prior(c) if self.prior else None
        return float("nan") if est is None else est

    def proposals(self, c: Candidate, max_candidates: int | None) -> list[Candidate]:
        """allowed(c), cut to the max_candidates with the best prior estimates (those
        without an estimate after them, in move order)."""
        nbrs = self.allowed(c)
        if max_candidates is None or len(nbrs) <= max_candidates:
            return nbrs
        if self.prior is None:
            raise SearchError(
                "max_candidates needs a prior to choose the candidates (prior='gradient')"
            )
        keys = np.array([self.prior_key(n) for n in nbrs])
        order = np.argsort(np.where(np.isnan(keys), np.inf, keys), kind="stable")
        return [nbrs[i] for i in order[:max_candidates]]


Generation = list[Candidate]


def _unique(cands) -> list[Candidate]:
    return list(dict.fromkeys(cands))


@dataclasses.dataclass(frozen=True)
class Beam:
    """Keep the `width` best programs each round (width=1 is greedy)."""

    width: int = 4
    rounds: int | None = None  # None: until the beam stops changing
    max_candidates: int | None = None  # per program and round, by prior (needs a prior)

    def __post_init__(self):
        if self.width < 1:
            raise SearchError(f"beam width must be >= 1, got {self.width}")

    @property
    def total(self):
        return self.rounds

    def run(self, pb: Problem, rng: np.random.Generator) -> Iterator[Generation]:
        beam = [pb.space.start]
        first = True
        for _ in range(self.rounds if self.rounds is not None else 10_000):
            pool = _unique(n for b in beam for n in pb.proposals(b, self.max_candidates))
            yield ([pb.space.start] + pool) if first else pool
            first = False
            # A program over budget must move on (to a cheaper one), even to a worse score.
            stay = [b for b in beam if pb.feasible(b)]
            ranked = sorted(_unique(stay + pool), key=pb.rank)[: self.width]
            if not ranked or set(ranked) == set(beam):
                return
            beam = ranked


@dataclasses.dataclass(frozen=True)
class Greedy(Beam):
    """Move to the best neighbour while it improves."""

    width: int = 1

    def __post_init__(self):
        if self.width != 1:
            raise SearchError("Greedy has width 1; use Beam(width=...)")


@dataclasses.dataclass(frozen=True)
class Evolutionary:
    population: int = 16
    generations: int = 10
    max_mutations: int = 3
    tournament: int = 2

    def __post_init__(self):
        if (
            self.population < 2
            or self.generations < 1
            or self.max_mutations < 1
            or self.tournament < 1
        ):
            raise SearchError(
                "Evolutionary needs population >= 2, generations >= 1, "
                "max_mutations >= 1 and tournament >= 1"
            )

    @property
    def total(self):
        return self.generations + 1

    def _mutate(self, pb: Problem, c: Candidate, rng) -> Candidate:
        # 1 move with probability 1/2, 2 with 1/4, ... (at most max_mutations): children
        # stay near their parents, with the occasional longer jump.
        for _ in range(min(int(rng.geometric(0.5)), self.max_mutations)):
            nbrs = pb.allowed(c)
            if not nbrs:
                break
            c = nbrs[int(rng.integers(len(nbrs)))]
        return c

    def run(self, pb: Problem, rng: np.random.Generator) -> Iterator[Generation]:
        start = pb.space.start
        children = [self._mutate(pb, start, rng) for _ in range(self.population - 1)]
        yield _unique([start] + children)
        pop = sorted(_unique([start] + children), key=pb.rank)[: self.population]
        for _ in range(self.generations):
            children = []
            for _ in range(self.population):
                picks = rng.integers(len(pop), size=self.tournament)
                parent = pop[int(picks.min())]  # pop is sorted: lowest index is best
                children.append(self._mutate(pb, parent, rng))
            yield _unique(children)
            pop = sorted(_unique(pop + children), key=pb.rank)[: self.population]


@dataclasses.dataclass(frozen=True)
class MCTS:
    """UCT with priors: a node is a program, its children the allowed moves. Each
    generation selects `batch` leaves by PUCT (Q normalized by the values seen, P from the
    prior estimates, uniform without), scores them together and backs their values up."""

    simulations: int = 256
    batch: int = 16
    c_puct: float = 1.25
    noise: float = 0.25  # share of Dirichlet noise in the root's priors (AlphaZero)
    alpha: float = 0.5  # its concentration

    def __post_init__(self):
        if self.simulations < 1 or self.batch < 1:
            raise SearchError("MCTS needs simulations >= 1 and batch >= 1")

    @property
    def total(self):
        return 1 + math.ceil((self.simulations - 1) / self.batch)

    def run(self, pb: Problem, rng: np.random.Generator) -> Iterator[Generation]:
        root = pb.space.start
        yield [root]
        N: dict[Candidate, float] = {root: 1.0}
        W: dict[Candidate, float] = {root: -pb.key(pb.score(root))}
        seen = [W[root]]
        priors: dict[Candidate, np.ndarray] = {}

        def p_of(node):
            if node not in priors:
                kids = pb.allowed(node)
                keys = np.array([pb.prior_key(k) for k in kids], np.float64)
                if kids and np.isfinite(keys).any():
                    keys = np.where(np.isfinite(keys), keys, np.nanmean(keys))
                    spread = keys.std() or 1.0
                    logits = -(keys - keys.min()) / spread
                    p = np.exp(logits)
                else:
                    p = np.ones(len(kids))
                p = p / max(p.sum(), 1e-300)
                if node == root and kids and self.noise:  # the key's say: root exploration
                    p = (1 - self.noise) * p + self.noise * rng.dirichlet([self.alpha] * len(kids))
                priors[node] = p
            return priors[node]

        def q_norm(node):
            lo, hi = min(seen), max(seen)
            q = W[node] / N[node]
            return (q - lo) / (hi - lo) if hi > lo else 0.5

        def backup(path, value):
            seen.append(value)
            for n in path:
                N[n] = N.get(n, 0.0) + 1
                W[n] = W.get(n, 0.0) + value

        done = 1
        while done < self.simulations:
            paths, leaves, pending = [], [], set()
            virtual: dict[Candidate, float] = {}
            want = min(self.batch, self.simulations - done)
            for _ in range(4 * want):
                if len(leaves) == want:
                    break
                node, path = root, [root]
                while True:
                    kids = pb.allowed(node)
                    if not kids:
                        break
                    p = p_of(node)
                    n_parent = N[node] + virtual.get(node, 0)
                    fpu = q_norm(node)  # unvisited children start at their parent's value
                    ucb = [
                        (q_norm(k) if k in N else fpu)
                        - (virtual.get(k, 0) > 0)
                        + self.c_puct
                        * p[i]
                        * math.sqrt(n_parent)
                        / (1 + N.get(k, 0) + virtual.get(k, 0))
                        for i, k in enumerate(kids)
                    ]
                    child = kids[int(np.argmax(ucb))]
                    path.append(child)
                    if child not in N:
                        break
                    node = child
                leaf = path[-1]
                for n in path:
                    virtual[n] = virtual.get(n, 0) + 1
                if leaf in N:  # a dead end (no moves): back up its known value again
                    backup(path, W[leaf] / N[leaf])
                    done += 1
                elif leaf not in pending:
                    pending.add(leaf)
                    paths.append(path)
                    leaves.append(leaf)
            if not leaves:
                return  # nothing new is reachable
            yield leaves
            for path in paths:
                backup(path, -pb.key(pb.score(path[-1])))
            done += len(leaves)


STRATEGIES = {"greedy": Greedy, "beam": Beam, "evolutionary": Evolutionary, "mcts": MCTS}


def as_strategy(strategy):
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise SearchError(
                f"strategy must be one of {sorted(STRATEGIES)} or a strategy "
                f"object, got {strategy!r}"
            )
        return STRATEGIES[strategy]()
    if not hasattr(strategy, "run"):
        raise SearchError(f"not a search strategy: {strategy!r}")
    return strategy
