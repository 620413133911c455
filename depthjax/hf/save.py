"""`save(model, dir)`: a DepthModel as a Hugging Face directory transformers can load.

Hugging Face architectures have one private layer per depth step, all sublayers on, so
the program is resolved on export: each step becomes layer i built from table row
`program.block[i]` (dropped steps simply vanish; tied, looped or reordered programs are
materialized with a warning). Gates must be 0 or 1; a gated-off sublayer is expressible
only by zeroing its output projection in pre-norm models, and only when asked.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import warnings

import jax
import numpy as np

from .. import kinds
from ..model import DepthModel
from ..program import is_concrete
from . import tensor_map
from .config import HFError, default_model_type, to_hf
from .safetensors_files import INDEX, write

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}
# The leaves a gated-off sublayer's update comes out of (zeroed by zero_gated=True).
_OUTPUTS = {"attn": ("attn", "o"), "mlp": ("mlp", "down")}


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000_000, "5GB" or "500MiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise HFError(f"max_shard_size={size!r} is not a size like 5GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def export_plan(model: DepthModel, *, zero_gated: bool = False):
    """(rows, zeroed): the table row of each exported layer, and per sublayer the layers
    whose output projection is zeroed. Raises HFError for programs HF cannot express."""
    program = model.program
    if not is_concrete(program) or program.block.ndim != 1:
        raise HFError("export needs one concrete program (not traced, not a batch)")
    rows, attn, mlp, parallel = (np.asarray(x) for x in
                                 (program.block, program.attn, program.mlp, program.parallel))
    if parallel.any():
        raise HFError(f"steps {np.flatnonzero(parallel).tolist()} run in parallel groups, "
                      "which Hugging Face architectures cannot express")
    zeroed = {}
    for name, gate in (("attn", attn), ("mlp", mlp)):
        fractional = np.flatnonzero((gate != 0) & (gate != 1))
        if fractional.size:
            raise HFError(f"{name} gates of steps {fractional.tolist()} are "
                          f"{gate[fractional].tolist()}; only 0 or 1 can be exported")
        off = np.flatnonzero(gate == 0)
        if off.size and not zero_gated:
            raise HFError(f"{name} is gated off at steps {off.tolist()}, which Hugging Face "
                          "architectures cannot skip; pass zero_gated=True to export those "
                          "sublayers with zero output weights")
        if off.size and model.config.norm_placement != "pre":
            raise HFError(f"{name} is gated off at steps {off.tolist()}; a "
                          f"{model.config.norm_placement}-norm model cannot express that even "
                          "with zeroed weights (its norm would still run)")
        zeroed[name] = set(off.tolist())
    if sorted(set(rows.tolist())) != rows.tolist():
        warnings.warn(f"program walks the table as {rows.tolist()} (tied, looped or "
                      f"reordered); the export materializes one private layer per step "
                      f"({len(rows)} layers)", stacklevel=3)
    return rows, zeroed


def _prepare_directory(path: str, overwrite: bool) -> None:
    os.makedirs(path, exist_ok=True)
    ours = [os.path.join(path, "config.json"), os.path.join(path, INDEX),
            *glob.glob(os.path.join(path, "model*.safetensors"))]
    existing = [p for p in ours if os.path.exists(p)]
    if existing and not overwrite:
        raise HFError(f"{path} already holds a checkpoint ({os.path.basename(existing[0])}); "
                      "pass overwrite=True (convert --overwrite) to replace it")
    for p in existing:   # stale shards of an earlier save would confuse loaders
        os.remove(p)


def save(model: DepthModel, path: str, *, model_type: str | None = None,
         zero_gated: bool = False, max_shard_size: int | str = "5GB", tokenizer=None,
         overwrite: bool = False, progress: bool | None = None) -> list[str]:
    """Write `model` to `path` as config.json + safetensors (sharded past max_shard_size).

    model_type: "llama", "mistral", "qwen2", "qwen3", "gpt2" or "bert" (default: inferred
    from the config). zero_gated: export gated-off sublayers of pre-norm models as zero
    output projections. tokenizer: a `tokenizers.Tokenizer` to write as tokenizer.json.
    Returns the names of the files written.
    """
    cfg = model.config
    model_type = model_type or default_model_type(cfg)
    rows, zeroed = export_plan(model, zero_gated=zero_gated)
    out_cfg = cfg.replace(n_layers=len(rows), layer_types=kinds.take(cfg, rows))
    config = to_hf(out_cfg, model_type)
    family = tensor_map.hf_family(model_type)
    prefix = tensor_map.PREFIXES[family][0]
    params = model.params
    _prepare_directory(path, overwrite)

    def leaf(leaf_path, layer):
        array = tensor_map.leaf_at(params, leaf_path)
        if layer is None:
            return np.asarray(array)
        if leaf_path[1:3] in (_OUTPUTS["attn"], _OUTPUTS["mlp"]):
            sublayer = leaf_path[1]
            if layer in zeroed[sublayer]:
                return np.zeros(array.shape[1:], np.float32)
        return np.asarray(array[int(rows[layer])])

    items = []
    for rule in tensor_map.rules_for(out_cfg, model_type):
        for layer in (range(len(rows)) if rule.per_layer else [None]):
            structs = [jax.ShapeDtypeStruct(
                np.shape(tensor_map.leaf_at(params, p))[1 if layer is not None else 0:], np.float32)
                for p in rule.leaves]
            nbytes = int(np.prod(jax.eval_shape(rule.to_hf, *structs).shape)) * 4
            make = (lambda rule=rule, layer=layer:
                    rule.to_hf(*(leaf(p, layer) for p in rule.leaves)).astype(np.float32))
            items.append((rule.hf_name(prefix, layer), nbytes, make))
    verbose = sum(n for _, n, _ in items) > 256 * 2**20 if progress is None else progress
    report = (lambda msg: print(f"[hf.save] {msg}", file=sys.stderr, flush=True)) if verbose else None
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    files = ["config.json"] + write(path, items, max_shard_bytes=parse_size(max_shard_size),
                                    progress=report)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
        files.append("tokenizer.json")
    return files

