"""Depth that adapts to the input, on the same block table and program.

mod            Mixture-of-Depths: per-step routers pick the top `capacity` fraction of
               tokens (training) or decide per token from a causal predictor (sampling)
recurrent      recurrent depth: a tied span looped a drawn number of times (truncated
               backprop), a loop count per token at inference (convergence)
first          FiRST: a per-sequence router picks which later steps run
routed_decode  decoding with per-token / per-sequence routed steps; a step's KV cache
               holds only the tokens that ran it
recurrent_decode  generation with depth-wise batching of tokens at different loop counts
training       fit(): a small training loop for these objectives
"""

from . import first, mod, recurrent, recurrent_decode, routed_decode
from .common import AdaptiveError
from .training import fit

__all__ = ["AdaptiveError", "first", "fit", "mod", "recurrent", "recurrent_decode", "routed_decode"]
