"""Recursive models: tie steps to K shared blocks, and relax the ties with per-step LoRA
(Bae et al., "Relaxed Recursive Transformers").
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..core import kinds, quant, step_params as steps_lib
from ..core.model import DepthModel
from ..core.program import ProgramError, is_concrete
from .table import step_rows, with_table


def tie_map(depth: int, n_unique: int, strategy: str) -> np.ndarray:
    """Shared block of each of `depth` steps.

    cycle:    step i runs block i mod K (the K blocks loop, any K <= depth);
    sequence: step i runs block i // (depth / K): K consecutive runs of equal length, so K
              must divide depth (use cycle, or drop/grow steps first, otherwise).
    """
    if not isinstance(n_unique, (int, np.integer)) or not 1 <= n_unique <= depth:
        raise ProgramError(
            f"n_unique must be an integer in 1..{depth} (the depth being tied), got {n_unique!r}"
        )
    i = np.arange(depth)
    if strategy == "cycle":
        return i % n_unique
    if strategy == "sequence":
        if depth % n_unique:
            raise ProgramError(
                f"sequence tying needs n_unique to divide the depth: {depth} "
                f"steps cannot be split into {n_unique} equal runs "
                f"(divisors: {[k for k in range(1, depth + 1) if depth % k == 0]})"
            )
        return i // (depth // n_unique)
    raise ValueError(f"strategy must be 'cycle' or 'sequence', got {strategy!r}")


def _is_norm(path: tuple) -> bool:
    return any(str(p).endswith("norm") for p in path)


def tie(
    model: DepthModel,
    n_unique: int,
    strategy: str = "cycle",
    init: str = "stepwise",
    keep_ends: bool = False,
    share_norms: bool = True,
) -> DepthModel:
    """Tie the model's steps to `n_unique` shared blocks.

    init (how shared block k is made from the steps' current weights):
      stepwise: the step at evenly spaced position floor(k * M / K) of the M tied steps;
      average:  the mean of the steps tied to block k;
      lower:    step k (the first K steps).
    keep_ends: the first and last steps keep private rows and are not tied.
    share_norms=False: every step keeps its own norm weights (as per-step deltas).
    Gates, parallel flags and per-step scales are kept; LoRA/deltas are folded first.
    Shared block k keeps the attention kind (window, RoPE table) of the step its weights
    come from (average: the first step tied to it); steps whose kind changes are named in
    a warning.
    """
    if init not in ("stepwise", "average", "lower"):
        raise ValueError(f"init must be 'stepwise', 'average' or 'lower', got {init!r}")
    rows = step_rows(model)  # leaves [depth, ...]
    depth = model.depth
    mid = np.arange(1, depth - 1) if keep_ends else np.arange(depth)
    if keep_ends and len(mid) < 1:
        raise ProgramError(f"keep_ends needs at least 3 steps, the program has {depth}")
    slot = tie_map(len(mid), n_unique, strategy)
    if init == "stepwise":
        src = mid[(np.arange(n_unique) * len(mid)) // n_unique]
        shared = jax.tree.map(lambda r: r[src], rows)
    elif init == "lower":
        src = mid[:n_unique]
        shared = jax.tree.map(lambda r: r[src], rows)
    else:
        src = mid[np.argmax(slot[None, :] == np.arange(n_unique)[:, None], axis=1)]
        onehot = jnp.asarray(slot[None, :] == np.arange(n_unique)[:, None], jnp.float32)
        weights = onehot / onehot.sum(1, keepdims=True)  # [K, M]
        shared = jax.tree.map(lambda r: jnp.tensordot(weights, r[mid], axes=1), rows)
    if keep_ends:
        blocks = jax.tree.map(lambda r, s: jnp.concatenate([r[:1], s, r[-1:]]), rows, shared)
        block = np.concatenate([[0], slot + 1, [n_unique + 1]])
        src = np.concatenate([[0], src, [depth - 1]])
    else:
        blocks, block = shared, slot
    old_rows = np.asarray(model.program.block)  # the row each step ran so far
    cfg = model.config
    changed = kinds.changed_steps(
        kinds.step_kinds(cfg, old_rows), kinds.step_kinds(cfg, old_rows[src][block])
    )
    if changed:
        warnings.warn(
            f"tie: steps {changed} now run a shared row of another attention kind "
            f"(layer_types {cfg.layer_types!r}: G global, L sliding window)",
            stacklevel=2,
        )
    program = model.program.replace(block=jnp.asarray(block, jnp.int32))
    steps = {
        k: v for k, v in (model.params.get("steps") or {}).items() if k not in ("delta", "lora")
    }
    if not share_norms:
        flat_rows = traverse_util.flatten_dict(rows)
        flat_blocks = traverse_util.flatten_dict(blocks)
        steps["delta"] = traverse_util.unflatten_dict(
            {p: flat_rows[p] - flat_blocks[p][block] for p in flat_rows if _is_norm(p)}
        )
    return with_table(model, blocks, program, steps, rows=old_rows[src])


def relax(
    model: DepthModel, original: DepthModel, rank: int | str, vectors: bool = True
) -> DepthModel:
    """Per-step LoRA on every projection of `model`'s (shared) blocks, initialized from the
    truncated SVD of (original step weight - shared weight), in params["steps"]["lora"].

    rank: an int for every kernel, or "full" for each kernel's min(in, out), at which the
    relaxed model reproduces `original` (to float tolerance) -- unless a step runs a row of
    another attention kind (window, RoPE base) than in `original`, which LoRA cannot
    change: those steps are named in a warning. With
    vectors=True, biases and norm weights also get exact per-step deltas
    (params["steps"]["delta"]), which are tiny next to the kernels.
    """
    quant.require_float(model.params["blocks"], "relax")
    quant.require_float(original.params["blocks"], "relax (the original)")
    if original.depth != model.depth:
        raise ProgramError(
            f"relax needs programs of equal depth: model has {model.depth} "
            f"steps, original has {original.depth}"
        )
    if (
        original.config.replace(
            n_layers=model.config.n_layers, layer_types=model.config.layer_types
        )
        != model.config
    ):
        raise ValueError("relax: model and original have different configs (beyond n_layers)")
    concrete = is_concrete(model.program) and is_concrete(original.program)  # not under jit
    changed = concrete and kinds.changed_steps(
        kinds.step_kinds(model.config, model.program.block),
        kinds.step_kinds(original.config, original.program.block),
    )
    if changed:
        warnings.warn(
            f"relax: steps {changed} run a row of another attention kind (window or RoPE "
            "base) than in `original`; LoRA cannot change that, so even rank='full' does "
            "not reproduce it",
            stacklevel=2,
        )
    plain = model.replace(params={k: v for k, v in model.params.items() if k != "steps"})
    have = traverse_util.flatten_dict(step_rows(plain))
    want = traverse_util.flatten_dict(step_rows(original))
    lora, delta = {}, {}
    for path, w in have.items():
        # float32 whatever the param_dtype: LoRA factors and deltas are float32 (the rule
        # of depthjax.core.step_params), and the SVD needs it
        diff = jnp.asarray(want[path], jnp.float32) - jnp.asarray(w, jnp.float32)
        if path[-1] != "kernel":
            if vectors:
                delta[path] = diff
            continue
        mats = jax.vmap(functools.partial(steps_lib.to_2d, path))(diff)  # [depth, in, out]
        bound = min(mats.shape[1:])
        r = bound if rank == "full" else rank
        if not isinstance(r, (int, np.integer)) or not 1 <= r <= bound:
            raise ValueError(
                f"rank={rank!r} is not in 1..{bound}, the rank bound "
                f"min(in, out) of {'/'.join(path)} {mats.shape[1:]} "
                "(rank='full' takes each kernel's bound)"
            )
        u, s, vt = jnp.linalg.svd(mats, full_matrices=False)
        lora[path + ("a",)] = u[:, :, :r] * s[:, None, :r]
        lora[path + ("b",)] = vt[:, :r]
    replaced = ("lora", "delta") if vectors else ("lora",)
    steps = {k: v for k, v in (model.params.get("steps") or {}).items() if k not in replaced}
    steps["lora"] = traverse_util.unflatten_dict(lora)
    if delta:
        steps["delta"] = traverse_util.unflatten_dict(delta)
    return model.replace(params={**model.params, "steps": steps})
