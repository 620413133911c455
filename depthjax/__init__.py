"""depthjax: depth as data. A transformer is a table of stacked blocks plus a Program
that says how the table is walked, run in one `lax.scan`."""

import sys as _sys

from . import (
    depth,
    eval,  # noqa: A004 (dj.eval is the DESIGN name)
    hf,
    metrics,
    presets,
    presets as configs,  # the DESIGN name; `presets` says what it holds
    search,
)
from .checkpoint import CheckpointError, load, save
from .config import ConfigError, ModelConfig, Remat
from .decoding import Generation, decode_step, generate, prefill
from .kv_cache import KVCache
from .model import DepthModel, Trace, apply, init
from .program import Program, ProgramError
from .prune import prune
from .recover import recover
from .specialize import Specialized, specialize
from .speculative import DraftStats

_sys.modules[__name__ + ".configs"] = presets  # `import depthjax.configs` keeps working

__version__ = "0.1.0"

__all__ = [
    # model
    "ModelConfig",
    "ConfigError",
    "Remat",
    "presets",
    "configs",
    "DepthModel",
    "Trace",
    "init",
    "apply",
    "Program",
    "ProgramError",
    # depth, metrics, pruning
    "depth",
    "metrics",
    "prune",
    "recover",
    "search",
    "eval",
    "specialize",
    "Specialized",
    # checkpoints and Hugging Face
    "save",
    "load",
    "CheckpointError",
    "hf",
    # generation
    "generate",
    "prefill",
    "decode_step",
    "KVCache",
    "Generation",
    "DraftStats",
]
