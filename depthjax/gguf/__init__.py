"""GGUF export for llama.cpp: `dj.gguf.save(model, path, dtype="f32"|"f16"|"q8_0")`.

A plain program becomes llama.cpp's `llama` architecture; a program with gated-off
sublayers becomes `deci`, whose per-layer head counts and feed-forward lengths are 0 where
a sublayer is off, so llama.cpp skips it (layout). The tokenizer travels as GGUF metadata
(vocab).
"""

from .export import DTYPES, save
from .layout import GGUFError

__all__ = ["save", "GGUFError", "DTYPES"]
