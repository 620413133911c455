"""What a search returns: programs ranked by score, with their costs, and the Pareto
front of score vs cost."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..core.model import DepthModel
from ..core.program import Program
from .space import Candidate, Space


@dataclasses.dataclass(frozen=True)
class Found:
    """One scored program. `program` runs on the start model's table; `model()` is the
    start model running it (its per-step parameters moved with their steps)."""

    candidate: Candidate
    score: float
    cost: float
    feasible: bool
    measures: dict = dataclasses.field(default_factory=dict)
    _space: Space | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def program(self) -> Program:
        return self.model().program

    @property
    def depth(self) -> int:
        return self.candidate.depth

    def model(self) -> DepthModel:
        return self._space.to_model(self.candidate)

    def describe(self) -> str:
        return self.candidate.describe()

    def to_dict(self) -> dict:
        return {
            "program": self.program.to_dict(),
            "steps": list(self.candidate.steps),
            "chain": self.describe(),
            "score": self.score,
            "cost": self.cost,
            "feasible": self.feasible,
            **{k: v for k, v in self.measures.items()},
        }


def pareto_front(found: list[Found], maximize: bool) -> list[Found]:
    """Programs no other program beats on both score and cost, by increasing cost."""
    key = (lambda f: -f.score) if maximize else (lambda f: f.score)
    out, best = [], np.inf
    for f in sorted(found, key=lambda f: (f.cost, key(f))):
        if key(f) < best:
            out.append(f)
            best = key(f)
    return out


@dataclasses.dataclass
class SearchResult:
    """ranked: every evaluated program within budget, best first. all: every evaluated
    program. start: the start program. history: the best feasible score after each
    generation. evaluated: distinct programs scored; forwards: (program, row) forwards."""

    ranked: list[Found]
    all: list[Found]
    start: Found
    objective: str
    maximize: bool
    budget: str
    cost_unit: str
    strategy: str
    evaluated: int
    forwards: int
    generations: int
    seconds: float
    history: list[float]

    @property
    def best(self) -> Found:
        if not self.ranked:
            raise LookupError(f"no evaluated program fits the budget ({self.budget})")
        return self.ranked[0]

    def __getitem__(self, i) -> Found:
        return self.ranked[i]

    def __len__(self) -> int:
        return len(self.ranked)

    def pareto(self) -> list[Found]:
        """The Pareto front of score vs cost over every evaluated program (inside the budget
        or not), cheapest first."""
        return pareto_front(self.all, self.maximize)

    def table(self, n: int = 10) -> str:
        rows = [
            f"{'rank':>4} {self.objective:>10} {'cost':>12} {'depth':>5}  program "
            "(start steps; a/m: only attn/mlp; |: parallel)"
        ]
        for i, f in enumerate([self.start] + self.ranked[:n]):
            rows.append(
                f"{'start' if i == 0 else i:>4} {f.score:>10.4f} {f.cost:>12.4g} "
                f"{f.depth:>5}  {f.describe()}"
            )
        return "\n".join(rows)

    def __repr__(self) -> str:
        best = (
            f"best {self.objective} {self.best.score:.4f}" if self.ranked else "none within budget"
        )
        return (
            f"SearchResult({self.strategy}, {self.budget}: {best}, start "
            f"{self.start.score:.4f}; {self.evaluated} programs in {self.generations} "
            f"generations, {self.seconds:.1f}s)\n{self.table(5)}"
        )

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "maximize": self.maximize,
            "budget": self.budget,
            "cost_unit": self.cost_unit,
            "strategy": self.strategy,
            "evaluated": self.evaluated,
            "forwards": self.forwards,
            "generations": self.generations,
            "seconds": self.seconds,
            "history": self.history,
            "start": self.start.to_dict(),
            "ranked": [f.to_dict() for f in self.ranked],
            "pareto": [f.to_dict() for f in self.pareto()],
        }

    def plot(self, path) -> None:
        """Score vs cost of every evaluated program, the Pareto front and the start."""
        from ..pruning.report import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(
            [f.cost for f in self.all],
            [f.score for f in self.all],
            s=8,
            alpha=0.35,
            label=f"evaluated ({len(self.all)})",
        )
        front = self.pareto()
        ax.plot(
            [f.cost for f in front],
            [f.score for f in front],
            "o-",
            color="C3",
            ms=4,
            label="Pareto front",
        )
        ax.scatter(
            [self.start.cost],
            [self.start.score],
            marker="*",
            s=120,
            color="k",
            label="start",
            zorder=3,
        )
        if self.ranked:
            ax.scatter(
                [self.best.cost],
                [self.best.score],
                marker="D",
                s=50,
                color="C2",
                label="best within budget",
                zorder=3,
            )
        ax.set_xlabel(f"cost ({self.cost_unit})")
        ax.set_ylabel(self.objective + (" (higher is better)" if self.maximize else ""))
        ax.legend(fontsize=7)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


@dataclasses.dataclass
class PerExampleResult:
    """A program per input row: best[e] is example e's best program within budget (its
    start program when nothing better was found), start[e] the start program's result on
    it. Examples are the rows of the objective's batches, in order."""

    best: list[Found]
    start: list[Found]
    objective: str
    maximize: bool
    budget: str
    strategy: str
    evaluated: int
    forwards: int
    generations: int
    seconds: float

    def __len__(self) -> int:
        return len(self.best)

    @property
    def scores(self) -> np.ndarray:
        return np.array([f.score for f in self.best])

    @property
    def start_scores(self) -> np.ndarray:
        return np.array([f.score for f in self.start])

    @property
    def programs(self) -> list[Candidate]:
        return [f.candidate for f in self.best]

    def gain(self) -> float:
        """Mean improvement of the per-example programs over the start program (>= 0)."""
        d = self.scores - self.start_scores
        return float(np.mean(d if self.maximize else -d))

    def counts(self) -> list[tuple[Candidate, int]]:
        """Distinct programs chosen, with how many examples chose each, most common first."""
        uniq: dict[Candidate, int] = {}
        for c in self.programs:
            uniq[c] = uniq.get(c, 0) + 1
        return sorted(uniq.items(), key=lambda kv: -kv[1])

    def __repr__(self) -> str:
        return (
            f"PerExampleResult({self.strategy}, {self.budget}: {len(self)} examples, mean "
            f"{self.objective} {self.start_scores.mean():.4f} -> {self.scores.mean():.4f}, "
            f"{len(self.counts())} distinct programs; {self.evaluated} (program, example) "
            f"pairs, {self.seconds:.1f}s)"
        )

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "maximize": self.maximize,
            "budget": self.budget,
            "strategy": self.strategy,
            "evaluated": self.evaluated,
            "generations": self.generations,
            "seconds": self.seconds,
            "gain": self.gain(),
            "best": [f.to_dict() for f in self.best],
            "start": [f.to_dict() for f in self.start],
        }
