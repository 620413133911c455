"""`load(dir)`: a local Hugging Face checkpoint as a DepthModel, streamed tensor by tensor.

Every tensor is checked before any data is read (missing, unexpected, wrong shape), then
each rule's leaves are filled layer by layer (threads, one layer each) into one
preallocated [n_layers, ...] numpy stack in the chosen param_dtype, placed on device
(optionally sharded) and freed before the next, so host memory holds at most one stacked
leaf group beyond the weights already placed. Files are read with `pread`, not mapped, so
no page of them stays resident.
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

from ..core.model import DepthModel, init
from ..core.program import Program
from ..files.safetensors_io import copy_into
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
    """Reader threads: reads and numpy copies release the GIL, so layers fill in parallel."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _fill(ckpt: Checkpoint, rule, prefix: str, stacks, pdt, layer: int | None) -> None:
    """Read one layer's HF tensor of `rule` and write its pieces into row `layer` of the
    preallocated stacks (the whole stack for a non-layer rule), in dtype `pdt`.

    The tensor is read in its stored dtype; a narrower one is widened before the
    rule's arithmetic (Gemma's 1 + w), so a float32 load of a bfloat16 file is exact and
    a bfloat16 load rounds once."""
    raw = ckpt.get(rule.hf_name(prefix, layer))
    if raw.dtype.itemsize < pdt.itemsize:
        raw = raw.astype(pdt)
    for stack, piece in zip(stacks, rule.to_ours(raw)):
        copy_into(stack if layer is None else stack[layer], piece)


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


_EXECUTION = ("dtype", "param_dtype", "remat", "attention_impl")


def load(
    path: str,
    *,
    shardings: ShardingSpec = None,
    ignore_keys=(),
    progress: bool | None = None,
    config: dict[str, Any] | None = None,
    **execution,
) -> DepthModel:
    """Load a local Hugging Face directory (config.json + safetensors) as a DepthModel.

    shardings: where each parameter goes -- one `jax.sharding.Sharding` for all, a pytree
    shaped like `params` with a Sharding per leaf, or a callable
    `(path: tuple[str, ...], shape) -> Sharding | None`; None uses the default device.
    ignore_keys: config.json keys to skip knowingly (unknown keys raise otherwise).
    progress: print one line per tensor group (default: for checkpoints over 256 MiB).
    config: the directory's config.json as already read (`ModelDir.read` passes it, so the
    file is read once); None reads it here.
    execution: ModelConfig fields that say how to hold and run it -- param_dtype (the
    weights' dtype: "float32" by default, "bfloat16" reads a bfloat16 checkpoint with no
    float32 round trip and half the memory), dtype (compute), remat, attention_impl.

    Memory: each parameter is filled into one preallocated [n_layers, ...] host array in
    param_dtype by reader threads (no memory map), placed on device and freed before the
    next, so peak host memory is the loaded weights plus one stacked group.
    """
    t0 = time.time()
    directory = model_directory(path)
    bad = sorted(set(execution) - set(_EXECUTION))
    if bad:
        raise TypeError(
            f"load() got unexpected keyword arguments {bad}; the model's shape "
            f"comes from config.json, only {_EXECUTION} may be chosen"
        )
    if config is None:
        config = read_config(directory)
    cfg, model_type = from_hf(config, ignore_keys=ignore_keys)
    cfg = cfg.replace(**execution)
    family = tensor_map.hf_family(model_type)
    shapes = jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
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
        structs = []
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
            structs.append(leaves)
        pdt = jnp.dtype(cfg.param_dtype)
        total = ckpt.nbytes()
        verbose = total > 256 * 2**20 if progress is None else progress
        params: dict = {}
        with ThreadPoolExecutor(_threads()) as pool:
            for k, (rule, leaves) in enumerate(zip(rules, structs)):
                stacks = [np.empty(x.shape, pdt) for x in leaves]
                layers = list(range(cfg.n_layers)) if rule.per_layer else [None]
                fill = functools.partial(_fill, ckpt, rule, prefix, stacks, pdt)
                list(pool.map(fill, layers))  # re-raises a worker's error
                for leaf_path, stack in zip(rule.leaves, stacks):
                    sharding = _sharding_for(shardings, leaf_path, stack.shape)
                    try:
                        _put(params, leaf_path, jax.device_put(stack, sharding))
                    except ValueError as e:
                        raise HFError(
                            f"cannot place parameter {'/'.join(leaf_path)} "
                            f"{list(stack.shape)} with {sharding}: {e}"
                        ) from None
                # transfers are asynchronous and hold their host stack until done: wait, so
                # host memory never holds more than this group's stacks
                jax.block_until_ready([tensor_map.leaf_at(params, p) for p in rule.leaves])
                del stacks
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
