"""Device mesh and parameter sharding: logical axis names resolved by ONE rules table.

Every parameter leaf gets logical axis names from its path (block leaves get a leading
"layers" axis, the row of the block table). `RULES` maps each logical name to mesh axes
of the `Mesh(data, fsdp, tensor)`:

* data:   pure data parallelism (parameters replicated);
* fsdp:   data parallelism with parameters (and optimizer state) sharded along "embed";
* tensor: Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A logical axis whose size is not divisible by its mesh axes stays unsharded, so any
model runs on any mesh, with a warning naming each such dimension (it costs memory on
every device); leaves with unknown names (e.g. adapters) are replicated.

Training places its state by these rules; so do `dj.shard(model, mesh)`, `dj.load(dir,
mesh=)` and `dj.hf.load(dir, mesh=)` for analysis. Every step of the research loop then
runs on the sharded parameters (jit follows their shardings) with the outputs of the
one-device run (tests/test_sharded_analysis.py).
"""

from __future__ import annotations

import math
import re
import warnings

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


def _keys(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def leaf_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at `path` (keys from the params root) with
    `ndim` dimensions; None for each axis of a leaf the table does not name."""
    top, rest = path[0], "/".join(path[1:])
    lead = ("layers",) if top == "blocks" else ()
    for pattern, names in _PARAM_AXES:
        if top in ("embed", "blocks", "head") and re.fullmatch(pattern, rest):
            if len(names) == ndim - len(lead):
                return lead + names
    return lead + (None,) * (ndim - len(lead))  # unknown leaf (adapter, custom state): replicated


def param_logical_axes(params) -> dict:
    """The params tree with each leaf replaced by a tuple of logical axis names (or None)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_logical_axes(_keys(path), np.ndim(leaf)), params
    )


def _resolve(axes: tuple, shape: tuple, mesh: Mesh) -> tuple[P, list[str]]:
    """The PartitionSpec of one array, and a note for each dimension left unsharded
    because its mesh axes do not divide its size."""
    missing = [a for a in MESH_AXES if a not in mesh.shape]
    if missing:
        raise ShardingError(
            f"mesh axes {tuple(mesh.axis_names)} lack {missing}: the sharding rules need "
            f"a mesh with axes {MESH_AXES} (depthjax.core.sharding.make_mesh)"
        )
    used, spec, misses = set(), [], []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
            if mesh_axes:
                misses.append(f"{name} {size} over {'x'.join(mesh_axes)}={n}")
    return P(*spec), misses


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec for one array: each logical axis -> its mesh axes from RULES, unless a
    mesh axis is already used by an earlier dimension or does not divide the size."""
    return _resolve(axes, shape, mesh)[0]


def warn_unsharded(params, mesh: Mesh) -> list[str]:
    """Warn (once, naming them) about the dimensions of `params` (arrays or
    ShapeDtypeStructs) that the rules would shard but the mesh does not divide: they are
    replicated on that axis, which costs memory on every device. Returns the notes
    ("head/out/kernel: vocab 50257 over tensor=2")."""
    notes = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys, shape = _keys(path), tuple(np.shape(x))
        _, misses = _resolve(leaf_logical_axes(keys, len(shape)), shape, mesh)
        notes += [f"{'/'.join(keys)}: {m}" for m in misses]
    if notes:
        more = f"; and {len(notes) - 6} more" if len(notes) > 6 else ""
        warnings.warn(
            f"{len(notes)} parameter dimension(s) stay unsharded because the mesh does not "
            f"divide them, so every device on that mesh axis holds them whole: "
            f"{'; '.join(notes[:6])}{more}. Pick mesh sizes that divide these dimensions "
            "(or pad the vocabulary) to shard them.",
            stacklevel=3,
        )
    return notes


def leaf_sharding(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """NamedSharding of the one parameter at `path` (what `dj.hf.load(mesh=)` places each
    tensor with as it is read): the same rule as `param_shardings`."""
    return NamedSharding(mesh, logical_to_spec(leaf_logical_axes(path, len(shape)), shape, mesh))


def param_shardings(params, mesh: Mesh):
    """NamedSharding for every parameter leaf (params may be arrays or ShapeDtypeStructs);
    warns about the dimensions the mesh does not divide (warn_unsharded)."""
    warn_unsharded(params, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: leaf_sharding(_keys(path), np.shape(x), mesh), params
    )


def shard(model, mesh: Mesh):
    """`model` with every parameter placed on `mesh` by the rules table (blocks' and
    embeddings' matrices sharded over fsdp x tensor, norms and adapters replicated). Every
    depthjax function runs on the result as on a one-device model, with the same outputs:
    jit follows the parameters' shardings, so the model is never gathered on one device."""
    return model.replace(params=jax.device_put(model.params, param_shardings(model.params, mesh)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    batch = tuple(a for a in RULES["batch"] if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(batch, *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the devices it is split over)."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def device_bytes(params) -> dict:
    """Bytes of `params` each device holds ({device: bytes}): what sharding saves."""
    held: dict = {}
    for x in jax.tree.leaves(params):
        for shard_ in x.addressable_shards:
            held[shard_.device] = held.get(shard_.device, 0) + shard_.data.nbytes
    return held
