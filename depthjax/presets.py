"""Named ModelConfig presets: `dj.presets.get("llama-tiny", n_layers=8)` (also `dj.configs`).

The tiny presets are what tests, the demo and the notebooks use; the larger ones match
the shapes of well-known checkpoints (for benchmarks and training from scratch).
"""

from __future__ import annotations

import difflib

from .config import ConfigError, ModelConfig

_PRESETS: dict[str, dict] = {
    # Byte-level tiny models (vocab 256): tests, demo, notebooks.
    "llama-tiny": dict(family="llama", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2),
    "llama-small": dict(
        family="llama", d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=2048
    ),
    "qwen2-tiny": dict(
        family="llama",
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        qkv_bias=True,
        rope_theta=1e6,
        tie_embeddings=True,
    ),
    "qwen3-tiny": dict(
        family="llama",
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        qk_norm=True,
        rope_theta=1e6,
    ),
    "gpt2-tiny": dict(family="gpt2", d_model=64, n_layers=4, n_heads=4, max_seq_len=512),
    "bert-tiny": dict(family="bert", d_model=64, n_layers=4, n_heads=4, max_seq_len=512),
    # Shapes of published models (random init; weights come from dj.hf.load).
    "gpt2": dict(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12),
    "llama-1b": dict(
        family="llama",
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
}


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name`, with any ModelConfig field overridden by keyword."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; known: {', '.join(names())}")
    return ModelConfig.from_dict({**_PRESETS[name], **overrides})
