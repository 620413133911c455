"""Program: how the block table is walked, one entry per depth step.

`block[i]` is the table row that runs at step i, `attn[i]`/`mlp[i]` scale that step's
sublayer updates (0 switches a sublayer off), and `parallel[i]` makes step i read the
same residual input as step i-1, its update added to the group's sum.

A Program is a pytree of four equal-length arrays, so programs of the same depth share
one compiled forward and can be stacked and `vmap`-ed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import DepthjaxError


class ProgramError(DepthjaxError):
    """A program that cannot be run on the model it is given to."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Program:
    block: jax.Array  # int32 [depth]
    attn: jax.Array  # float32 [depth]
    mlp: jax.Array  # float32 [depth]
    parallel: jax.Array  # bool [depth]

    @classmethod
    def create(cls, block, attn=None, mlp=None, parallel=None, *, n_blocks=None) -> Program:
        """A validated program; gates default to 1 and `parallel` to False (a scalar applies
        to every step)."""
        block_np = np.asarray(block)
        if block_np.ndim != 1:
            raise ProgramError(f"block ids must be a 1-d sequence, got shape {block_np.shape}")
        if block_np.size and not np.issubdtype(block_np.dtype, np.integer):
            raise ProgramError(
                f"block ids must be integers, got {block_np.dtype}: {block_np.tolist()}"
            )
        if block_np.size and (block_np.min() < 0 or block_np.max() > np.iinfo(np.int32).max):
            if block_np.min() < 0:
                raise ProgramError(
                    f"negative block ids at steps {np.flatnonzero(block_np < 0).tolist()}"
                )
            big = block_np[block_np > np.iinfo(np.int32).max]
            raise ProgramError(
                f"block ids {big[:4].tolist()} do not fit int32 (row numbers of the table)"
            )
        n = block_np.size
        full = lambda x, default: np.full(n, default if x is None else x) if np.ndim(x) == 0 else x
        program = cls(
            block=jnp.asarray(block_np, jnp.int32),
            attn=jnp.asarray(_gates(full(attn, 1.0), "attn"), jnp.float32),
            mlp=jnp.asarray(_gates(full(mlp, 1.0), "mlp"), jnp.float32),
            parallel=jnp.asarray(_flags(full(parallel, False)), bool),
        )
        validate(program, n_blocks)
        return program

    @classmethod
    def sequential(cls, n: int) -> Program:
        """Steps 0..n-1 run table rows 0..n-1 in order, all gates 1."""
        return cls.create(np.arange(n))

    @property
    def depth(self) -> int:
        return self.block.shape[-1]

    def replace(self, **changes) -> Program:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, list]:
        return {
            f.name: np.asarray(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d, *, n_blocks=None) -> Program:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ProgramError(f"unknown program fields {sorted(unknown)}")
        return cls.create(
            d["block"], d.get("attn"), d.get("mlp"), d.get("parallel"), n_blocks=n_blocks
        )

    def __repr__(self) -> str:
        if not is_concrete(self):
            return f"Program(depth={self.depth}, traced)"
        rows = [f"{'step':>5} {'block':>5} {'attn':>6} {'mlp':>6} parallel"]
        for i, (b, a, m, p) in enumerate(
            zip(
                *(
                    np.asarray(x).reshape(-1, self.depth)[0]
                    for x in (self.block, self.attn, self.mlp, self.parallel)
                )
            )
        ):
            rows.append(f"{i:>5} {b:>5} {a:>6.3g} {m:>6.3g} {'  ||' if p else ''}")
        batch = f", batch={self.block.shape[:-1]}" if self.block.ndim > 1 else ""
        return f"Program(depth={self.depth}{batch})\n" + "\n".join(rows)

    # `_repr_html_` (notebooks) is attached by depthjax/core/display.py.


def _gates(values, name: str) -> np.ndarray:
    """Gate values as float32: numbers only (a string or bool is a mistake, not a gate)."""
    a = np.asarray(values)
    if a.dtype == bool or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise ProgramError(f"{name} gates must be numbers, got {np.asarray(values).tolist()!r}")
    return a


def _flags(values) -> np.ndarray:
    """parallel flags: booleans, or the integers 0 and 1."""
    a = np.asarray(values)
    if a.dtype != bool and not (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()):
        raise ProgramError(f"parallel flags must be true/false (or 0/1), got {a.tolist()!r}")
    return a


def is_concrete(program: Program) -> bool:
    """True when the program holds values (not tracers), so it can be checked on the host."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(program))


def validate(program: Program, n_blocks: int | None = None) -> None:
    """Raise ProgramError naming the problem; a no-op for traced programs (inside jit)."""
    if not is_concrete(program):
        return
    fields = ("block", "attn", "mlp", "parallel")
    lengths = tuple((np.shape(getattr(program, f)) or (0,))[-1] for f in fields)
    if len(set(lengths)) != 1:
        raise ProgramError(
            "block, attn, mlp and parallel must have equal lengths, got "
            + ", ".join(f"{f}={n}" for f, n in zip(fields, lengths))
        )
    if lengths[0] == 0:
        raise ProgramError("empty program: a model needs at least one step")
    block = np.asarray(program.block)
    if not np.issubdtype(block.dtype, np.integer):
        raise ProgramError(f"block ids must be integers, got dtype {block.dtype}")
    block = block.reshape(-1, lengths[0])  # programs may carry leading batch axes (vmap)
    if (block < 0).any():
        raise ProgramError(
            f"negative block ids at steps {np.flatnonzero(block.min(0) < 0).tolist()}"
        )
    if n_blocks is not None and (block >= n_blocks).any():
        bad = np.flatnonzero(block.max(0) >= n_blocks).tolist()
        raise ProgramError(
            f"block ids out of range at steps {bad}: the table has {n_blocks} "
            f"rows (valid ids 0..{n_blocks - 1})"
        )
    if np.asarray(program.parallel).reshape(-1, lengths[0])[:, 0].any():
        raise ProgramError(
            "parallel[0] must be False: the first step has no step to share input with"
        )
    for gate in ("attn", "mlp"):
        if not np.isfinite(np.asarray(getattr(program, gate))).all():
            raise ProgramError(f"{gate} gates must be finite")


def share_structure(programs: Program) -> Program:
    """Stacked programs [K, depth] that run the same rows with the same parallel flags keep
    those once ([depth]); only their gates stay batched [K, depth]. Host side (concrete);
    see `map_programs`. Other batches are returned as they are."""
    if programs.block.ndim != 2 or not is_concrete(programs):
        return programs
    block, parallel = np.asarray(programs.block), np.asarray(programs.parallel)
    if (block == block[:1]).all() and (parallel == parallel[:1]).all():
        return programs.replace(block=programs.block[0], parallel=programs.parallel[0])
    return programs


def map_programs(fn, programs: Program, *, batch_size: int | None = None):
    """`lax.map` of fn(program) over a batch of programs, `batch_size` at a time (vmapped).

    A batch from `share_structure` maps only the gates: every program of a chunk then
    reads the same table row at each step, gathered once and shared (one wider matmul),
    instead of each program gathering its own copy."""
    if programs.block.ndim == 1:
        shared = lambda gates: fn(programs.replace(attn=gates[0], mlp=gates[1]))
        return jax.lax.map(shared, (programs.attn, programs.mlp), batch_size=batch_size)
    return jax.lax.map(fn, programs, batch_size=batch_size)
