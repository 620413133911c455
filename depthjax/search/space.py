"""The search space: programs reachable from a start program by depth moves.

A `Candidate` is written relative to the start model's program: `steps[j]` is the start
step that runs at position j (so per-step parameters travel with it, as in
`depth.reorder`), `attn[j]`/`mlp[j]` keep (1) or switch off (0) that step's gates, and
`parallel[j]` joins position j to the parallel group of position j-1.

Moves (each one edit away; `neighbours` lists them in a fixed order):

* ``drop``           remove one position (the block-pruning move);
* ``drop_sublayer``  switch off one position's attention or MLP;
* ``repeat``         run one position once more, right after itself (a loop);
* ``swap``           exchange two adjacent positions (reorder);
* ``parallelize``    make a position read the same input as the one before it.

Positions whose gates are both off are removed (they do nothing), so every program has
one canonical candidate and the same program is never scored twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel
from ..core.program import Program, ProgramError
from ..depth.edit import select_steps, selected_parallel
from ..errors import DepthjaxError

MOVES = ("drop", "drop_sublayer", "repeat", "swap", "parallelize")


class SearchError(DepthjaxError):
    """A search that cannot run as asked (bad moves, budget, objective or strategy)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A program as a chain of start steps with gate masks (hashable, compact)."""

    steps: tuple[int, ...]
    attn: tuple[int, ...]
    mlp: tuple[int, ...]
    parallel: tuple[bool, ...]

    @classmethod
    def start(cls, depth: int) -> Candidate:
        return cls(tuple(range(depth)), (1,) * depth, (1,) * depth, (False,) * depth)

    @property
    def depth(self) -> int:
        return len(self.steps)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "steps": np.asarray(self.steps, np.int32),
            "attn": np.asarray(self.attn, np.float32),
            "mlp": np.asarray(self.mlp, np.float32),
            "parallel": np.asarray(self.parallel, bool),
        }

    def describe(self) -> str:
        """Compact text: start steps in order, `a`/`m` = only attention/MLP on, `|` = parallel
        with the previous one; e.g. "0 1 2a |3 3"."""
        out = []
        for s, a, m, p in zip(self.steps, self.attn, self.mlp, self.parallel):
            out.append(("|" if p else "") + str(s) + ("" if a and m else "a" if a else "m"))
        return " ".join(out)


class Space:
    """Moves from a start model's program, with a cap on the depth (so that every candidate
    pads to one length and all of them share one compiled forward)."""

    def __init__(
        self, model: DepthModel, moves: Iterable[str] = MOVES, max_depth: int | None = None
    ):
        moves = tuple(moves)
        unknown = [m for m in moves if m not in MOVES]
        if unknown or not moves:
            raise SearchError(f"moves must be a non-empty subset of {MOVES}, got {moves}")
        self.moves = moves
        self.model = model
        self._start_np = {k: np.asarray(v) for k, v in model.program.to_dict().items()}
        self.start_on = (np.asarray(model.program.attn) != 0, np.asarray(model.program.mlp) != 0)
        grow = "repeat" in moves
        self.max_depth = model.depth + (2 if grow else 0) if max_depth is None else int(max_depth)
        if self.max_depth < 1:
            raise SearchError(f"max_depth must be at least 1, got {max_depth}")
        # Removing a step whose gates are both 0 changes nothing, unless a recovery adapter
        # adds to the residual at that step (then it is kept).
        self._compact = "adapter" not in model.params.get("steps", {})
        self.start = self.canonical(Candidate.start(model.depth))
        if self.start.depth > self.max_depth:
            raise SearchError(
                f"the start program has {self.start.depth} steps, more than "
                f"max_depth={self.max_depth}"
            )

    # -- building candidates -------------------------------------------------------------
    def canonical(self, c: Candidate) -> Candidate:
        """Gates that are already 0 in the start count as off; fully-off positions removed."""
        attn = tuple(int(a and self.start_on[0][s]) for s, a in zip(c.steps, c.attn))
        mlp = tuple(int(m and self.start_on[1][s]) for s, m in zip(c.steps, c.mlp))
        c = dataclasses.replace(c, attn=attn, mlp=mlp)
        if not self._compact:
            return c
        keep = [j for j in range(c.depth) if attn[j] or mlp[j]]
        return c if len(keep) == c.depth else self._select(c, keep)

    def _select(self, c: Candidate, idx) -> Candidate:
        """Positions idx of c, in that order (the group rule of `depth.select_steps`)."""
        idx = list(idx)
        if not idx:
            return dataclasses.replace(c, steps=(), attn=(), mlp=(), parallel=())
        parallel = selected_parallel(np.asarray(c.parallel), idx, np)
        return Candidate(
            tuple(c.steps[i] for i in idx),
            tuple(c.attn[i] for i in idx),
            tuple(c.mlp[i] for i in idx),
            tuple(bool(p) for p in parallel),
        )

    def neighbours(self, c: Candidate) -> list[Candidate]:
        """Every valid candidate one move away from c (no duplicates, c excluded)."""
        n, out = c.depth, []
        for move in self.moves:
            for i in range(n):
                if move == "drop" and n > 1:
                    out.append(self._select(c, [j for j in range(n) if j != i]))
                elif move == "drop_sublayer":
                    for gate in ("attn", "mlp"):
                        g = list(getattr(c, gate))
                        if g[i]:
                            g[i] = 0
                            out.append(dataclasses.replace(c, **{gate: tuple(g)}))
                elif move == "repeat" and n < self.max_depth:
                    out.append(self._select(c, list(range(i + 1)) + list(range(i, n))))
                elif move == "swap" and i + 1 < n:
                    out.append(self._select(c, list(range(i)) + [i + 1, i] + list(range(i + 2, n))))
                elif move == "parallelize" and i > 0 and not c.parallel[i]:
                    joined = c.parallel[:i] + (True,) + c.parallel[i + 1 :]
                    out.append(dataclasses.replace(c, parallel=joined))
        seen, unique = {c}, []
        for nb in map(self.canonical, out):
            if nb.depth and nb not in seen:
                seen.add(nb)
                unique.append(nb)
        return unique

    # -- candidates as programs ----------------------------------------------------------
    def pack(self, cands: list[Candidate]) -> dict[str, np.ndarray]:
        """Stacked candidate arrays [K, max_depth], padded with gated-off steps (exact no-ops:
        a step with both gates 0 and parallel=False adds exactly 0)."""
        K, L = len(cands), self.max_depth
        out = {
            "steps": np.zeros((K, L), np.int32),
            "attn": np.zeros((K, L), np.float32),
            "mlp": np.zeros((K, L), np.float32),
            "parallel": np.zeros((K, L), bool),
            "real": np.zeros((K, L), np.float32),
        }
        for k, c in enumerate(cands):
            if c.depth > L:
                raise SearchError(f"candidate of depth {c.depth} exceeds max_depth={L}")
            for name, value in c.arrays().items():
                out[name][k, : c.depth] = value
            out["real"][k, : c.depth] = 1
        return out

    def program(self, c: Candidate) -> Program:
        """Candidate c as a Program of numpy arrays on the start model's table (for costs)."""
        s = np.asarray(c.steps, np.int64)
        p = self._start_np
        return Program(
            block=p["block"][s],
            attn=p["attn"][s] * np.asarray(c.attn, np.float32),
            mlp=p["mlp"][s] * np.asarray(c.mlp, np.float32),
            parallel=np.asarray(c.parallel, bool),
        )

    def to_model(self, c: Candidate) -> DepthModel:
        """The start model running candidate c (the table and per-step parameters are the
        start model's, selected by step; nothing is copied)."""
        m = select_steps(self.model, np.asarray(c.steps))
        p = m.program
        program = p.replace(
            attn=p.attn * jnp.asarray(c.attn, jnp.float32),
            mlp=p.mlp * jnp.asarray(c.mlp, jnp.float32),
            parallel=jnp.asarray(c.parallel, bool),
        )
        try:
            return m.with_program(program)
        except ProgramError as e:  # a bug in a move, never the user's input
            raise AssertionError(f"invalid candidate {c}: {e}") from e
