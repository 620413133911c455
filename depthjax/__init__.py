"""depthjax: depth as data. A transformer is a table of stacked blocks plus a Program
that says how the table is walked, run in one `lax.scan`."""

from . import configs, depth, metrics
from . import hf
from .checkpoint import CheckpointError, load, save
from .config import ConfigError, ModelConfig, Remat
from .model import DepthModel, Trace, apply, init
from .program import Program, ProgramError
from .decoding import Generation, decode_step, generate, prefill
from .kv_cache import KVCache
from .prune import prune
from .recover import recover

__version__ = "0.1.0"

__all__ = ["ConfigError", "DepthModel", "ModelConfig", "Program", "ProgramError", "Remat",
           "Trace", "apply", "configs", "init"]
__all__ += ["CheckpointError", "load", "save"]
__all__ += ["hf"]
__all__ += ["depth", "metrics", "prune", "recover"]
__all__ += ["Generation", "KVCache", "decode_step", "generate", "prefill"]
