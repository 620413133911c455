"""Program-only edits: drop, drop_sublayers, repeat, reorder, parallelize.

They return a model whose params are the *same* buffers (the table is shared, nothing is
copied); only the program and the per-step parameters (params["steps"]) change. Steps are
indexed by position in the current program.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..core.model import DepthModel
from ..core.program import Program, ProgramError


def step_list(model: DepthModel, steps, what: str = "steps", *, allow_empty=True) -> np.ndarray:
    """`steps` (an int or ints) as a sorted unique int array, checked against the depth."""
    arr = np.atleast_1d(np.asarray(steps if steps is not None else [], dtype=object))
    if arr.size and not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in arr
    ):
        raise ProgramError(f"{what} must be integers, got {list(arr)}")
    arr = np.asarray(arr, np.int64)
    bad = arr[(arr < 0) | (arr >= model.depth)]
    if bad.size:
        raise ProgramError(
            f"{what} {bad.tolist()} out of range: the program has "
            f"{model.depth} steps (valid 0..{model.depth - 1})"
        )
    if not allow_empty and not arr.size:
        raise ProgramError(f"{what} is empty")
    return np.unique(arr)


def group_ids(parallel, xp=jnp) -> jax.Array:
    """Parallel group of every step: a group starts at each step with parallel=False."""
    return xp.cumsum(~xp.asarray(parallel, bool), axis=-1)


def selected_parallel(parallel, idx, xp=jnp):
    """The parallel flags of the steps `idx` (ints) selected from a program with flags
    `parallel`: a selected step stays in its group only when it directly follows an earlier
    member of that group in the selection. xp=np for host-side candidate programs."""
    idx = np.asarray(idx, np.int64)
    gid = group_ids(parallel, xp)
    return xp.concatenate(
        [xp.zeros(1, bool), (gid[idx[1:]] == gid[idx[:-1]]) & xp.asarray(idx[1:] > idx[:-1])]
    )


def select_steps(model: DepthModel, idx: Sequence[int]) -> DepthModel:
    """The model whose step j is the current step idx[j] (program entry and per-step params).

    A selected step stays in its parallel group only when it directly follows an earlier
    member of that group in the selection; otherwise it starts a new group.
    """
    idx = np.asarray(idx, np.int64)
    if idx.size == 0:
        raise ProgramError("the edit leaves no steps: a model needs at least one")
    prog = model.program
    program = Program(
        block=prog.block[idx],
        attn=prog.attn[idx],
        mlp=prog.mlp[idx],
        parallel=selected_parallel(prog.parallel, idx),
    )
    params = dict(model.params)
    if "steps" in params:
        params["steps"] = jax.tree.map(lambda a: a[idx], params["steps"])
    return model.replace(params=params, program=program)


def drop(model: DepthModel, steps) -> DepthModel:
    """Remove whole steps."""
    gone = step_list(model, steps)
    keep = np.setdiff1d(np.arange(model.depth), gone)
    if not keep.size:
        raise ProgramError(f"dropping steps {gone.tolist()} removes every step of the program")
    return select_steps(model, keep)


def drop_sublayers(model: DepthModel, attn=(), mlp=()) -> DepthModel:
    """Gate off the attention and/or MLP sublayers of the given steps (gates set to 0)."""
    a = step_list(model, attn, "attn steps")
    m = step_list(model, mlp, "mlp steps")
    prog = model.program
    return model.replace(
        program=prog.replace(attn=prog.attn.at[a].set(0.0), mlp=prog.mlp.at[m].set(0.0))
    )


def repeat(model: DepthModel, steps, times: int) -> DepthModel:
    """Run the contiguous span `steps` `times` times in a row (times=1: unchanged)."""
    span = step_list(model, steps, allow_empty=False)
    if np.any(np.diff(span) != 1):
        raise ProgramError(f"repeat needs a contiguous span of steps, got {span.tolist()}")
    if not isinstance(times, (int, np.integer)) or times < 1:
        raise ProgramError(f"times must be a positive integer, got {times!r}")
    before, after = np.arange(span[0]), np.arange(span[-1] + 1, model.depth)
    return select_steps(model, np.concatenate([before, np.tile(span, times), after]))


def reorder(model: DepthModel, order: Iterable[int]) -> DepthModel:
    """Run the existing steps in `order`: any sequence, repeats and omissions allowed
    (a chain of layers). Gates and per-step parameters travel with their step."""
    order = np.asarray(list(order))
    step_list(model, order, "order", allow_empty=False)
    return select_steps(model, order)


def parallelize(model: DepthModel, groups, combine: str = "sum") -> DepthModel:
    """Each group of consecutive steps reads one shared input.

    combine="sum": the group's updates are added (parallel blocks);
    combine="mean": the group's full layer outputs are averaged, x + mean(updates)
    ("Transformer Layers as Painters"), via a per-step scale of 1/len(group).
    """
    if combine not in ("sum", "mean"):
        raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
    groups = [step_list(model, g, "parallel group", allow_empty=False) for g in groups]
    seen = np.concatenate(groups) if groups else np.zeros(0, int)
    if len(np.unique(seen)) != len(seen):
        raise ProgramError(f"parallel groups overlap: {[g.tolist() for g in groups]}")
    parallel = model.program.parallel
    params = dict(model.params)
    scale = jnp.ones(model.depth)
    for g in groups:
        if np.any(np.diff(g) != 1):
            raise ProgramError(f"a parallel group must be consecutive steps, got {g.tolist()}")
        parallel = parallel.at[g[0]].set(False).at[g[1:]].set(True)
        if g[-1] + 1 < model.depth:  # the step after the group starts its own group
            parallel = parallel.at[g[-1] + 1].set(False)
        scale = scale.at[g].set(1.0 / len(g) if combine == "mean" else 1.0)
    if combine == "mean":
        steps = dict(params.get("steps", {}))
        steps["scale"] = steps.get("scale", jnp.ones(model.depth)) * scale
        params["steps"] = steps
    return model.replace(params=params, program=model.program.replace(parallel=parallel))
