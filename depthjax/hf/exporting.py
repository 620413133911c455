"""`save(model, dir)`: a DepthModel as a Hugging Face directory transformers can load.

Hugging Face architectures have one private layer per depth step, all sublayers on, so
the program is resolved on export: each step becomes layer i built from table row
`program.block[i]` (dropped steps simply vanish; tied, looped or reordered programs are
materialized with a warning), each layer keeping its row's attention kind. Per-step
state is folded into the weights where that is exact (`depthjax.depth.fold`: LoRA and
deltas, gates and scales, recovery adapters' biases); a gated-off sublayer is exported
as zeroed output weights only when asked (zero_gated), and an adapter that cannot be
folded is refused unless drop_adapters says to leave every adapter out.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..core import quant, rows as rows_lib
from ..core.model import DepthModel
from ..core.program import ProgramError, is_concrete
from ..core.stitched import Stitched
from ..depth import folding as fold_lib
from ..files import atomic
from . import tensor_map
from .config import HFError, default_model_type, to_hf
from .safetensors_files import INDEX, write

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, "5GB" or "500MiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise HFError(f"max_shard_size={size!r} is not a size like 5GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# The conversion to the Hugging Face layout (mostly transposes) runs compiled: XLA's
# tiled, threaded copy is ~7x numpy's strided one. All tensors of a layer come from one
# program that takes the step as data, cached across saves by the configs (a fresh process
# compiles a handful of programs, not one per layer, tensor and eager op).
@functools.partial(jax.jit, static_argnames=("source", "target", "model_type", "dtype"))
def _convert_layer(arrays, step, *, source, target, model_type, dtype):
    """[every per-layer HF tensor of step `step`] of the folded model whose arrays are
    `arrays` (Folded.arrays), in tensor_map.rules_for order; source: its config."""
    leaf = lambda p: fold_lib.fold_leaf(source, arrays, step, p[1:])
    rules = [rule for rule in tensor_map.rules_for(target, model_type) if rule.per_layer]
    return [rule.to_hf(*map(leaf, rule.leaves)).astype(dtype) for rule in rules]


@functools.partial(jax.jit, static_argnames=("name", "target", "model_type", "dtype"))
def _convert_top(top, *, name, target, model_type, dtype):
    """The HF tensor of the top-level (not per-layer) rule `name` from {"embed", "head"}."""
    (rule,) = [r for r in tensor_map.rules_for(target, model_type) if r.name == name]
    return rule.to_hf(*(tensor_map.leaf_at(top, p) for p in rule.leaves)).astype(dtype)


def _is_identity(fn, leaves, dtype) -> bool:
    """Whether fn(*leaves) is leaves[0] itself, already in `dtype` (nothing to compute)."""
    closed = jax.make_jaxpr(fn)(*leaves)
    return (
        not closed.eqns
        and closed.jaxpr.outvars == closed.jaxpr.invars[:1]
        and leaves[0].dtype == dtype
    )


def export_plan(
    model: DepthModel,
    *,
    zero_gated: bool = False,
    drop_adapters: bool = False,
    skip_gated: bool = False,
    error: type[Exception] = HFError,
) -> fold_lib.Folded:
    """The folded layers of the export (see depthjax.depth.fold). Raises `error` (HFError)
    for programs and per-step state the target cannot express. skip_gated: the target
    skips gated-off sublayers itself (GGUF's deci graph), so they are allowed; their folded
    weights are zero and the caller leaves them out."""
    program = model.program
    if not is_concrete(program) or program.block.ndim != 1:
        raise error("export needs one concrete program (not traced, not a batch)")
    if quant.is_quantized(model.params["blocks"]):
        raise error(
            "this model is quantized (dj.depth.quantize), which the export cannot express; "
            "dequantize it first (dj.depth.dequantize, or dj.hf.save(..., dequantize=True))"
        )
    if not rows_lib.is_plain(model.params["blocks"]):  # linearly expanded rows (TLEG)
        model = model.replace(
            params={**model.params, "blocks": rows_lib.floats(model.params["blocks"])}
        )
    rows = np.asarray(program.block)
    for name, gate in (("attn", np.asarray(program.attn)), ("mlp", np.asarray(program.mlp))):
        off = np.flatnonzero(gate == 0)
        if off.size and not (zero_gated or skip_gated):
            raise error(
                f"{name} is gated off at steps {off.tolist()}, which Hugging Face "
                "architectures cannot skip; pass zero_gated=True to export those "
                "sublayers with zero output weights"
            )
    found = fold_lib.adapters(model)
    if found and drop_adapters:
        warnings.warn(
            f"drop_adapters=True: the export leaves out the recovery adapters of "
            f"steps {[i for i, _, _ in found]} and differs from this model",
            stacklevel=3,
        )
        params = {k: v for k, v in model.params.items() if k != "final_adapter"}
        if "adapter" in params.get("steps", {}):
            params["steps"] = {k: v for k, v in params["steps"].items() if k != "adapter"}
        model = model.replace(params=params)
    if sorted(set(rows.tolist())) != rows.tolist():
        warnings.warn(
            f"program walks the table as {rows.tolist()} (tied, looped or "
            f"reordered); the export materializes one private layer per step "
            f"({len(rows)} layers)",
            stacklevel=3,
        )
    try:
        return fold_lib.Folded(model)
    except (fold_lib.FoldError, ProgramError) as e:
        hint = (
            "; pass drop_adapters=True (convert --drop-adapters) to export without any "
            "recovery adapter, knowing the export then differs"
            if "adapter" in str(e)
            else ""
        )
        raise error(f"cannot export: {e}{hint}") from None


def _is_weights_file(name: str) -> bool:
    """Files of the checkpoint itself, replaced (never carried over) by a save."""
    return name in ("config.json", INDEX) or fnmatch.fnmatch(name, "model*.safetensors")


def _check_target(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise HFError(f"{path} is a file; a Hugging Face checkpoint is a directory")
    existing = sorted(
        n for n in (os.listdir(path) if os.path.isdir(path) else ()) if _is_weights_file(n)
    )
    if existing and not overwrite:
        raise HFError(
            f"{path} already holds a checkpoint ({existing[0]}); "
            "pass overwrite=True (convert --overwrite) to replace it"
        )


def stitched_message(target: str) -> str:
    return (
        "a stitched model (dj.depth.stitch: two models of different widths joined by a "
        f"linear map) cannot be written as {target}, which holds one width; save it with "
        "dj.save, or export its parts (stitched.front, stitched.back)"
    )


def save(
    model: DepthModel,
    path: str,
    *,
    model_type: str | None = None,
    zero_gated: bool = False,
    drop_adapters: bool = False,
    dequantize: bool = False,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    files=(),
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[str]:
    """Write `model` to `path` as config.json + safetensors (sharded past max_shard_size),
    in the model's param_dtype (a bfloat16 model writes a bfloat16 checkpoint, as
    transformers' save_pretrained does).

    model_type: one of depthjax.hf.config.MODEL_TYPES (default: inferred from the config).
    zero_gated: export gated-off sublayers as zeroed output weights (output projections,
    or output norms of peri/out-norm models). drop_adapters: export without any recovery
    adapter, foldable ones included (with a warning naming their steps: the export then
    differs from the model); without it an adapter that cannot be folded raises HFError.
    dequantize: export a quantized model (dj.depth.quantize) with its rows dequantized to
    floats; without it a quantized model raises HFError (Hugging Face configs cannot say
    which layer holds which bit width).
    tokenizer: a `tokenizers.Tokenizer` to write as tokenizer.json; files: other files to
    copy in (tokenizer_config.json, ...). overwrite=True replaces an existing checkpoint at
    `path`: the new one is written beside it and swapped in (depthjax.files.atomic), so a kill at
    any moment leaves the old or the new one whole; other files already in `path` (a
    README, a tokenizer) are kept. Returns the names of the files written.
    """
    if isinstance(model, Stitched):
        raise HFError(stitched_message("a Hugging Face checkpoint"))
    if quant.is_quantized(model.params["blocks"]):
        if not dequantize:
            widths = sorted(set(np.asarray(quant.row_bits(model.params["blocks"])).tolist()))
            raise HFError(
                f"this model is quantized (dj.depth.quantize: bit widths {widths} per "
                "table row), which a Hugging Face "
                "checkpoint cannot express; pass dequantize=True to export its rows "
                "dequantized to floats"
            )
    if not rows_lib.is_plain(model.params["blocks"]):  # dequantized or expanded rows
        model = model.replace(
            params={**model.params, "blocks": rows_lib.floats(model.params["blocks"])}
        )
    model_type = model_type or default_model_type(model.config)
    folded = export_plan(model, zero_gated=zero_gated, drop_adapters=drop_adapters)
    out_cfg = folded.config
    if out_cfg.bias and not model.config.bias and model_type not in ("llama", "gpt2"):
        raise HFError(
            f"cannot export to {model_type}: the recovery adapters' biases fold "
            "into MLP biases, which it does not have; export as model_type='llama' "
            "(attention_bias / mlp_bias) or pass drop_adapters=True"
        )
    config = to_hf(out_cfg, model_type)
    family = tensor_map.hf_family(model_type)
    prefix = tensor_map.PREFIXES[family][0]
    top = {"embed": folded.embed, "head": folded.head}
    _check_target(path, overwrite)

    dtype = jnp.dtype(model.config.param_dtype)  # the weights' own dtype, no widening
    config["dtype"] = model.config.param_dtype
    rules = tensor_map.rules_for(out_cfg, model_type)
    layer_rules = [rule for rule in rules if rule.per_layer]

    arrays, converted = folded.arrays, {}  # {layer: future of its converted tensors}
    static = dict(target=out_cfg, model_type=model_type, dtype=model.config.param_dtype)

    # One thread (`dispatcher`, opened with the staging directory below) traces, compiles
    # and runs the layers' conversions: layers 0 and 1 while the top-level tensors are
    # made and written, then layer i + 1 while layer i is written, so memory holds two
    # layers' converted tensors at most.
    def dispatch(layer: int) -> None:
        if layer not in converted and layer < out_cfg.n_layers:
            converted[layer] = dispatcher.submit(
                _convert_layer, arrays, np.int32(layer), source=folded.model.config, **static
            )

    def layer_tensor(layer: int, k: int) -> np.ndarray:
        dispatch(layer)
        dispatch(layer + 1)
        for i in [i for i in converted if i < layer]:
            del converted[i]
        return np.asarray(converted[layer].result()[k])

    def top_tensor(rule) -> np.ndarray:
        leaves = [tensor_map.leaf_at(top, p) for p in rule.leaves]
        if _is_identity(rule.to_hf, leaves, dtype):  # e.g. the embedding: no copy, no compile
            return np.asarray(leaves[0])
        return np.asarray(_convert_top(top, name=rule.name, **static))

    def hf_shape(rule, leaf_shape) -> tuple[int, ...]:
        structs = [jax.ShapeDtypeStruct(leaf_shape(p), dtype) for p in rule.leaves]
        return jax.eval_shape(rule.to_hf, *structs).shape

    items = []  # (name, shape, dtype, make), the top-level tensors first, then layer by layer
    for rule in rules:
        if not rule.per_layer:
            shape = hf_shape(rule, lambda p: np.shape(tensor_map.leaf_at(top, p)))
            make = lambda rule=rule: top_tensor(rule)
            items.append((rule.hf_name(prefix), shape, dtype, make))
    layer_shapes = [hf_shape(rule, lambda p: folded.shape(p[1:])) for rule in layer_rules]
    for layer in range(out_cfg.n_layers):
        for k, rule in enumerate(layer_rules):
            make = lambda layer=layer, k=k: layer_tensor(layer, k)
            items.append((rule.hf_name(prefix, layer), layer_shapes[k], dtype, make))
    total = sum(int(np.prod(s)) for _, s, _, _ in items) * dtype.itemsize
    verbose = total > 256 * 2**20 if progress is None else progress
    report = (
        (lambda msg: print(f"[hf.save] {msg}", file=sys.stderr, flush=True)) if verbose else None
    )
    extra = [Path(f) for f in files]
    for f in extra:
        if _is_weights_file(f.name) or not f.is_file():
            raise HFError(f"save(files=...): {f} is not a file that can go beside the weights")
    with (
        ThreadPoolExecutor(1) as dispatcher,
        atomic.replacing(path, carry=lambda name: not _is_weights_file(name)) as tmp,
    ):
        dispatch(0)
        dispatch(1)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        written = ["config.json"] + write(
            str(tmp), items, max_shard_bytes=parse_size(max_shard_size), progress=report
        )
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
            written.append(f.name)
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            written.append("tokenizer.json")
    return written
