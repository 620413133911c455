"""Running a model's program to produce tokens.

cached       decoding with a KV cache indexed by program step (the cached walk policy),
             `prefill` / `decode_step`, early exit
driver       `generate`: the one decode driver, and the plain policy
speculative  the self-speculative policy (draft with a cheaper program, verify in one pass)
specialized  `specialize`: one concrete program compiled as structure (the deploy path)
kv_cache     the KV cache by step; sampling: temperature, top-k, top-p

Every path walks the program with the one walker, depthjax.core.walk.
"""

from .cached import decode_step, prefill
from .driver import Generation, Plain, generate
from .kv_cache import KVCache
from .sampling import GenerationError, Sampler
from .specialized import Specialized, specialize
from .speculative import Draft, DraftStats

__all__ = [
    "Draft",
    "DraftStats",
    "Generation",
    "GenerationError",
    "KVCache",
    "Plain",
    "Sampler",
    "Specialized",
    "decode_step",
    "generate",
    "prefill",
    "specialize",
]
