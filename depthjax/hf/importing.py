"""`load(dir)`: a local Hugging Face checkpoint as a DepthModel, streamed tensor by tensor.

Every tensor is checked before any data is read (missing, unexpected, wrong shape). Then,
per rule, every layer's tensor is read (threads, `pread`, no memory map) straight into its
slot of one preallocated [n_layers, ...] array in the stored dtype; rules that only
reshape become a view of it (adopted by jax's CPU backend without a copy), the others
(transposes, head splits, Gemma's 1 + w) are one jitted, vmapped conversion that also
casts to `param_dtype`. Each group is placed (optionally sharded) and freed before the
next, so host memory holds the placed weights plus one raw stacked group. With mesh= the
conversion runs on the host's CPU device and each device receives only its shards, so no
accelerator ever holds a whole group.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core import sharding as sharding_lib
from ..core.model import DepthModel, init
from ..core.program import Program
from ..files.safetensors_io import aligned_empty
from . import tensor_map
from .config import HFError, from_hf
from .safetensors_files import Checkpoint

Sharding = jax.sharding.Sharding
ShardingFn = Callable[[tuple[str, ...], tuple[int, ...]], Sharding | None]
ShardingSpec = Sharding | ShardingFn | dict | None


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise HFError(f"{directory} is not a directory")
    if not os.path.exists(path):
        raise HFError(f"no config.json in {directory}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON: {e}") from None


def model_directory(path: str) -> str:
    """The directory holding config.json; for a sentence-transformers directory, that of
    its Transformer module (modules.json)."""
    modules = os.path.join(path, "modules.json")
    if os.path.exists(os.path.join(path, "config.json")) or not os.path.exists(modules):
        return path
    from .pooling import module_path, read_modules

    for module in read_modules(modules):
        if module.get("type", "").endswith("Transformer"):
            return module_path(path, module, modules)
    raise HFError(f"{modules} lists no Transformer module")


def _sharding_for(shardings: ShardingSpec, path: tuple[str, ...], shape) -> Sharding | None:
    if shardings is None or isinstance(shardings, Sharding):
        return shardings
    if callable(shardings):
        return shardings(path, shape)
    node = shardings
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise HFError(f"shardings has no entry for parameter {'/'.join(path)}")
        node = node[key]
    return node


def _threads() -> int:
    """Reader threads: `pread` releases the GIL, so layers are read in parallel."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _group(ckpt: Checkpoint, rule, prefix: str, n_layers: int, pool) -> np.ndarray:
    """The rule's HF tensor of every layer, stacked [n_layers, *hf_shape] (one tensor for a
    non-layer rule) in its stored dtype: each layer read straight into its slot (threads),
    in a 64-byte aligned array that jax's CPU backend adopts without a copy."""
    names = _names(rule, prefix, n_layers)
    first = ckpt.info(names[0])
    raw = aligned_empty(((len(names),) if rule.per_layer else ()) + first.shape, first.dtype)
    slots = raw if rule.per_layer else raw[None]
    list(pool.map(lambda j: ckpt.read_into(names[j], slots[j]), range(len(names))))
    return raw


def _as_view(rule, raw: np.ndarray, pdt) -> np.ndarray | None:
    """Our leaf as a view of `raw` when the rule only reshapes it (embeddings, norms,
    biases) and no cast is needed; else None."""
    layer = raw[0] if rule.per_layer else raw
    pieces = rule.to_ours(layer)  # numpy views, or a new array for arithmetic rules
    if raw.dtype != pdt or len(pieces) != 1:
        return None
    (piece,) = pieces
    if not (piece.flags.c_contiguous and piece.size == layer.size):
        return None
    if not np.shares_memory(piece, layer) or piece.ctypes.data != layer.ctypes.data:
        return None
    return raw.reshape(raw.shape[:1] * rule.per_layer + piece.shape)


def _mesh_sharding(mesh, path: tuple[str, ...], shape) -> Sharding:
    return sharding_lib.leaf_sharding(path, tuple(shape), mesh)


def _host_device():
    """The CPU device: a sharded load converts groups there, so no accelerator ever holds
    a whole group; None where jax runs without its CPU backend."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def _convert(rule, raw: np.ndarray, pdt, host=False) -> tuple:
    """Our leaves from a raw group, computed by XLA (transposes, head splits, Gemma's 1 + w)
    and cast to `pdt` in the same pass; the arithmetic runs in the wider of the stored and
    the parameter dtype, so a float32 load of a bfloat16 file is exact and a bfloat16 load
    rounds once."""
    layer = jax.ShapeDtypeStruct(raw.shape[rule.per_layer :], raw.dtype)
    shapes = tuple(x.shape for x in jax.eval_shape(rule.to_ours, layer))
    # the converter's code and every shape fix what it computes: reloads reuse the compile
    key = (rule.to_ours.__code__, raw.shape, raw.dtype, pdt, shapes, rule.per_layer)
    if key not in _CONVERTERS:
        if len(_CONVERTERS) > 256:  # many different models in one process
            _CONVERTERS.clear()
        wide = jnp.promote_types(raw.dtype, pdt)
        one = lambda w: tuple(p.astype(pdt) for p in rule.to_ours(w.astype(wide)))
        _CONVERTERS[key] = jax.jit(jax.vmap(one) if rule.per_layer else one)
    device = _host_device() if host else None
    return _CONVERTERS[key](raw if device is None else jax.device_put(raw, device))


_CONVERTERS: dict = {}


def _put(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _names(rule: tensor_map.TensorRule, prefix: str, n_layers: int) -> list[str]:
    if rule.per_layer:
        return [rule.hf_name(prefix, i) for i in range(n_layers)]
    return [rule.hf_name(prefix)]


def _check_names(ckpt: Checkpoint, rules, prefix: str, cfg, family: str) -> list[str]:
    """Raise on missing or unexpected tensors; return the known-but-unmodelled ones."""
    n = cfg.n_layers
    expected = {name for rule in rules for name in _names(rule, prefix, n)}
    extra = lambda templates: {t.format(p=prefix, i=i) for t in templates for i in range(n)}
    buffers = extra(tensor_map.BUFFERS.get(family, ()))
    unmodelled = extra(tensor_map.NOT_MODELLED.get(family, ()))
    if cfg.tie_embeddings and family != "bert":
        buffers.add("lm_head.weight")  # allowed if it equals the embedding (checked later)
    names = ckpt.names()
    missing = sorted(expected - names)
    if missing:
        raise HFError(
            f"checkpoint {ckpt.directory} is missing {len(missing)} tensor(s) the "
            f"config needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    unexpected = sorted(names - expected - buffers - unmodelled)
    if unexpected:
        raise HFError(
            f"checkpoint {ckpt.directory} has {len(unexpected)} tensor(s) that "
            f"depthjax does not understand for this config: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    return sorted(names & unmodelled)


_EXECUTION = ("dtype", "param_dtype", "remat", "attention_impl", "attention_chunk")


def load(
    path: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shardings: ShardingSpec = None,
    ignore_keys=(),
    progress: bool | None = None,
    config: dict[str, Any] | None = None,
    **execution,
) -> DepthModel:
    """Load a local Hugging Face directory (config.json + safetensors) as a DepthModel.

    mesh: place every parameter on this `Mesh(data, fsdp, tensor)` (`dj.core.sharding.
    make_mesh`) by the rules table of `depthjax.core.sharding`, each tensor group as it is
    read (converted on the host, then sent shard by shard), so no device ever holds more
    than its shards; the same placement as `dj.shard(model, mesh)`.
    shardings: where each parameter goes (instead of mesh) -- one `jax.sharding.Sharding`
    for all, a pytree shaped like `params` with a Sharding per leaf, or a callable
    `(path: tuple[str, ...], shape) -> Sharding | None`; None uses the default device.
    ignore_keys: config.json keys to skip knowingly (unknown keys raise otherwise).
    progress: print one line per tensor group (default: for checkpoints over 256 MiB).
    config: the directory's config.json as already read (`ModelDir.read` passes it, so the
    file is read once); None reads it here.
    execution: ModelConfig fields that say how to hold and run it -- param_dtype (the
    weights' dtype: "float32" by default, "bfloat16" reads a bfloat16 checkpoint with no
    float32 round trip and half the memory), dtype (compute), remat, attention_impl,
    attention_chunk.

    Memory: peak host memory is the loaded weights in param_dtype plus one stacked tensor
    group in the file's dtype (benchmarks/load.py measures it against transformers).
    """
    t0 = time.time()
    directory = model_directory(path)
    bad = sorted(set(execution) - set(_EXECUTION))
    if bad:
        raise TypeError(
            f"load() got unexpected keyword arguments {bad}; the model's shape "
            f"comes from config.json, only {_EXECUTION} may be chosen"
        )
    if mesh is not None:
        if shardings is not None:
            raise HFError("pass mesh= or shardings=, not both")
        shardings = functools.partial(_mesh_sharding, mesh)
    if config is None:
        config = read_config(directory)
    cfg, model_type = from_hf(config, ignore_keys=ignore_keys)
    cfg = cfg.replace(**execution)
    family = tensor_map.hf_family(model_type)
    shapes = jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
    if mesh is not None:
        sharding_lib.warn_unsharded(shapes, mesh)
    rules = tensor_map.rules_for(cfg, model_type)
    with Checkpoint(directory) as ckpt:
        names = ckpt.names()
        prefix = next(
            (
                p
                for p in tensor_map.PREFIXES[family]
                if tensor_map.PROBE[family].format(p=p) in names
            ),
            None,
        )
        if prefix is None:
            probes = [tensor_map.PROBE[family].format(p=p) for p in tensor_map.PREFIXES[family]]
            raise HFError(
                f"checkpoint {directory} has none of {probes}: not a {model_type} model's weights"
            )
        unmodelled = _check_names(ckpt, rules, prefix, cfg, family)
        for rule in rules:
            leaves = [tensor_map.leaf_at(shapes, p) for p in rule.leaves]
            per_layer = [
                jax.ShapeDtypeStruct(x.shape[1:] if rule.per_layer else x.shape, x.dtype)
                for x in leaves
            ]
            want = tuple(jax.eval_shape(rule.to_hf, *per_layer).shape)
            for name in _names(rule, prefix, cfg.n_layers):
                if ckpt.shape(name) != want:
                    raise HFError(
                        f"tensor {name!r} has shape {list(ckpt.shape(name))}, the "
                        f"config implies {list(want)}"
                    )
        pdt = jnp.dtype(cfg.param_dtype)
        total = ckpt.nbytes()
        verbose = total > 256 * 2**20 if progress is None else progress
        params: dict = {}
        with ThreadPoolExecutor(_threads()) as pool:
            for k, rule in enumerate(rules):
                raw = _group(ckpt, rule, prefix, cfg.n_layers, pool)
                view = _as_view(rule, raw, pdt)
                leaves = (
                    (view,) if view is not None else _convert(rule, raw, pdt, host=mesh is not None)
                )
                for leaf_path, leaf in zip(rule.leaves, leaves):
                    sharding = _sharding_for(shardings, leaf_path, leaf.shape)
                    try:
                        _put(params, leaf_path, jax.device_put(leaf, sharding))
                    except ValueError as e:
                        raise HFError(
                            f"cannot place parameter {'/'.join(leaf_path)} "
                            f"{list(leaf.shape)} with {sharding}: {e}"
                        ) from None
                # transfers are asynchronous and hold the raw group until done: wait, so
                # host memory never holds more than one raw group beyond the weights
                jax.block_until_ready([tensor_map.leaf_at(params, p) for p in rule.leaves])
                del raw, view, leaves
                if verbose:
                    print(
                        f"[hf.load] {k + 1}/{len(rules)} {rule.name.format(p=prefix, i='*')} "
                        f"({time.time() - t0:.1f}s)",
                        file=sys.stderr,
                        flush=True,
                    )
        if cfg.tie_embeddings and "lm_head.weight" in names and family != "bert":
            head = ckpt.get("lm_head.weight").astype(pdt, copy=False)
            if not np.array_equal(head, np.asarray(params["embed"]["tok"]["embedding"])):
                raise HFError(
                    "tie_word_embeddings is true but lm_head.weight differs from the "
                    "token embedding; set tie_word_embeddings=false in config.json"
                )
    if unmodelled:
        warnings.warn(
            f"ignored {unmodelled}: depthjax's {model_type} model has no such "
            "parameters (it returns the last hidden states)",
            stacklevel=2,
        )
    params.setdefault("head", {})
    return DepthModel(cfg, params, Program.sequential(cfg.n_layers))
