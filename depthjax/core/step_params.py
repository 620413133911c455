"""Per-step parameters: state indexed by program step, never by table row.

`params["steps"]` is optional; every leaf has a leading [depth] axis and is scanned along
with the program. It holds what makes one step differ from the shared row it runs:

* ``delta``: a subtree of the block leaves, added to the gathered row (e.g. untied norms);
* ``lora``:  at a kernel's position in the block tree, ``{"a": [in, r], "b": [r, out]}``:
  the step runs kernel + (a @ b) reshaped to the kernel (relaxed recursive models);
* ``scale``: [depth] multiplier on the step's whole update (averaged parallel groups);
* ``adapter``: ``{"bias": [D], "a": [D, r], "b": [r, D]}`` (a/b optional): the step's
  input x becomes x + bias + (x @ a) @ b before the block runs (recovery of pruned units,
  see depthjax.pruning.recovery). A group's input is adapted once, at the group's first step.

Transforms that select, reorder or insert steps move these leaves with the program
(see `depthjax.depth`).

dtype rule: per-step parameters are float32 whatever the model's param_dtype (they are
small, often trained, and hold corrections a bfloat16 weight would round away); a row plus
its delta / LoRA is summed in float32 and then runs in the compute dtype.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import traverse_util


def kernel_in_dims(path: tuple) -> int:
    """Leading kernel axes that are inputs: 2 for the attention output [H, Dh, D], else 1."""
    return 2 if path[-2:] == ("o", "kernel") else 1


def to_2d(path: tuple, kernel):
    """One row's kernel (no table axis) as a matrix [in, out]."""
    n_in = kernel_in_dims(path)
    return kernel.reshape(math.prod(kernel.shape[:n_in]), -1)


def effective_row(row: dict, step: dict | None) -> dict:
    """The block parameters that this step actually runs."""
    if not step:
        return row
    delta = traverse_util.flatten_dict(step.get("delta", {}))
    lora = traverse_util.flatten_dict(step.get("lora", {}))
    return traverse_util.unflatten_dict(
        {p: effective_leaf(p, w, delta, lora) for p, w in traverse_util.flatten_dict(row).items()}
    )


def effective_leaf(path: tuple, w, delta: dict, lora: dict):
    """One leaf of `effective_row`: the row's leaf at `path` plus this step's delta and
    LoRA (flat dicts of one step's values; LoRA keyed kernel path + ("a",) / ("b",)).
    The sum is formed in float32 (at least), so a bfloat16 row keeps a small float32
    correction instead of rounding it away."""
    if path in delta or path + ("a",) in lora:
        w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    if path in delta:
        w = w + delta[path]
    if path + ("a",) in lora:
        w = w + (lora[path + ("a",)] @ lora[path + ("b",)]).reshape(w.shape).astype(w.dtype)
    return w


def adapter_update(adapter: dict, x_BTD):
    """What an adapter adds to the residual stream x [B, T, D]."""
    out = jnp.broadcast_to(adapter["bias"].astype(x_BTD.dtype), x_BTD.shape)
    if "a" in adapter:
        out = out + (x_BTD @ adapter["a"].astype(x_BTD.dtype)) @ adapter["b"].astype(x_BTD.dtype)
    return out


def scale(step: dict | None):
    return 1.0 if not step or "scale" not in step else step["scale"]


def check(steps: dict | None, depth: int) -> None:
    """Every per-step leaf must have a leading axis equal to the program depth."""
    for path, leaf in traverse_util.flatten_dict(steps or {}).items():
        if jnp.ndim(leaf) == 0 or leaf.shape[0] != depth:
            raise ValueError(
                f"params['steps'] leaf {'/'.join(path)} has shape "
                f"{jnp.shape(leaf)}; its leading axis must be the program "
                f"depth {depth}"
            )
