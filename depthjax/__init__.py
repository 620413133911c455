"""depthjax: depth as data. A transformer is a table of stacked blocks plus a Program
that says how the table is walked, run in one `lax.scan`.

Subpackages, by what they hold:

core       the model: config, program, layers, attention, block, the scanned model, loss, FLOPs
inference  the one program walker, the one decode driver (`generate`) and its policies,
           the KV cache, sampling, the specialized (static) fast path
depth      pure program/table edits: drop, repeat, reorder, tie, relax, grow, fold, ...
metrics    importance scores per step, sublayer or span
pruning    choosing what to remove (`prune`), recovering it (`recover`), reports
adaptive   depth that adapts to the input: Mixture-of-Depths, recurrent depth, FiRST
eval       task evaluation and the lm-eval adapter
search     program search under a budget
files      files on disk: model directories, checkpoints, integrity, tokenizers, corpora
hf         Hugging Face checkpoints in and out
gguf       GGUF files for llama.cpp (gated-off sublayers stay skipped)
train      the training loop, data, checkpoints of runs
cli        one module per command of the `depthjax` console script
"""

from . import configs, depth, eval, files, gguf, hf, inference, metrics, search  # noqa: A004 (dj.eval: DESIGN name)
from .core.config import ConfigError, ModelConfig, Remat
from .core.model import DepthModel, InputError, Trace, apply, init
from .core.program import Program, ProgramError
from .core.sharding import ShardingError, shard
from .errors import DepthjaxError
from .files.checkpoint import CheckpointError, load, save
from .inference import (
    DraftStats,
    Generation,
    GenerationError,
    KVCache,
    Specialized,
    decode_step,
    generate,
    prefill,
    specialize,
)
from .pruning.choose import PruneError, prune
from .pruning.recovery import RecoverError, recover

__version__ = "0.1.0"

__all__ = [
    "DepthjaxError",
    # model
    "ModelConfig",
    "ConfigError",
    "Remat",
    "configs",
    "DepthModel",
    "Trace",
    "init",
    "apply",
    "InputError",
    "Program",
    "ProgramError",
    "shard",
    "ShardingError",
    # depth, metrics, pruning
    "depth",
    "metrics",
    "prune",
    "PruneError",
    "recover",
    "RecoverError",
    "search",
    "inference",
    "files",
    "eval",
    "specialize",
    "Specialized",
    # checkpoints and Hugging Face
    "save",
    "load",
    "CheckpointError",
    "hf",
    "gguf",
    # generation
    "generate",
    "prefill",
    "decode_step",
    "KVCache",
    "Generation",
    "GenerationError",
    "DraftStats",
]
