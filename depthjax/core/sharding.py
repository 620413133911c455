"""Device mesh and parameter sharding: logical axis names resolved by ONE rules table.

Every parameter leaf gets logical axis names from its path (block leaves get a leading
"layers" axis, the row of the block table). `RULES` maps each logical name to mesh axes
of the `Mesh(data, fsdp, tensor)`:

* data:   pure data parallelism (parameters replicated);
* fsdp:   data parallelism with parameters (and optimizer state) sharded along "embed";
* tensor: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A logical axis whose size is not divisible by its mesh axes stays unsharded, so any
model runs on any mesh; leaves with unknown names (e.g. adapters) are replicated.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..errors import DepthjaxError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple shards over their product); the ONE rules table.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "head_dim": (),
    "norm": (),
    "length": (),
}

# (regex on the "/"-joined path below embed|blocks|head, logical axes without "layers")
_PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"tok/embedding", ("vocab", "embed")),
    (r"(pos|type)/embedding", (None, "embed")),
    (r"attn/q/kernel", ("embed", "heads", "head_dim")),
    (r"attn/[kv]/kernel", ("embed", "kv_heads", "head_dim")),
    (r"attn/q/bias", ("heads", "head_dim")),
    (r"attn/[kv]/bias", ("kv_heads", "head_dim")),
    (r"attn/o/kernel", ("heads", "head_dim", "embed")),
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/(gate|up)/bias", ("mlp",)),
    (r"mlp/down/kernel", ("mlp", "embed")),
    (r"out/kernel", ("embed", "vocab")),
    (r".*(norm[^/]*)/(scale|bias)", ("norm",)),
    (r"(attn/o|mlp/down)/bias", ("norm",)),
]


class ShardingError(DepthjaxError):
    """A mesh request that the available devices cannot satisfy."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor); one size may be -1 to use the remaining devices."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {free}")
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            raise ShardingError(f"mesh.{k} must be a positive integer or -1, got {v!r}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ShardingError(
                f"{len(devices)} devices cannot be split into mesh "
                f"{sizes} (the fixed axes need a multiple of {fixed})"
            )
        sizes[free[0]] = len(devices) // fixed
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ShardingError(
            f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x "
            f"tensor={sizes['tensor']} = {n} devices, but {len(devices)} are "
            "available (set one axis to -1 to fill)"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:  # topology-aware placement on TPU/GPU; plain reshape where that is unsupported
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def param_logical_axes(params) -> dict:
    """The params tree with each leaf replaced by a tuple of logical axis names (or None)."""

    def axes(path, leaf):
        keys = [getattr(k, "key", str(k)) for k in path]
        top, rest = keys[0], "/".join(keys[1:])
        lead = ("layers",) if top == "blocks" else ()
        ndim = np.ndim(leaf) - len(lead)
        for pattern, names in _PARAM_AXES:
            if top in ("embed", "blocks", "head") and re.fullmatch(pattern, rest):
                if len(names) == ndim:
                    return lead + names
        return lead + (None,) * ndim  # unknown leaf (adapter, custom state): replicated

    return jax.tree_util.tree_map_with_path(axes, params)


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical axis -> its mesh axes from RULES, unless a
    mesh axis is already used by an earlier dimension or does not divide the size."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def param_shardings(params, mesh: Mesh):
    """NamedSharding for every parameter leaf (params may be arrays or ShapeDtypeStructs)."""
    axes = param_logical_axes(params)
    return jax.tree.map(
        lambda x, a: NamedSharding(mesh, logical_to_spec(a, np.shape(x), mesh)),
        params,
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    batch = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(batch, *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the devices it is split over)."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])
