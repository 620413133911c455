"""Named ModelConfig presets: `dj.configs.get("llama-tiny", n_layers=8)`.

The tiny presets are what tests, the demo and the notebooks use; the larger ones are the
configs of well-known checkpoints, field for field (tests/test_presets.py reads their
config.json): `dj.hf.load` of the downloaded weights gives exactly that config.
"""

from __future__ import annotations

import difflib

from .core.config import ConfigError, ModelConfig

_GEMMA = dict(norm_placement="peri", mlp="geglu", tie_embeddings=True)
_LLAMA3 = dict(
    family="llama",
    vocab_size=128256,
    n_kv_heads=8,
    max_seq_len=131072,
    norm_eps=1e-5,
    rope_theta=500000.0,
)


def _rope_llama3(factor: float) -> dict:
    return dict(
        type="llama3",
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_seq_len=8192,
    )


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
    "mistral-tiny": dict(
        family="llama", d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, sliding_window=8
    ),
    "gemma2-tiny": dict(
        family="llama",
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        **_GEMMA,
        embed_scale=8.0,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=8,
        layer_types="LG",
    ),
    "gemma3-tiny": dict(
        family="llama",
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        **_GEMMA,
        embed_scale=8.0,
        qk_norm="head",
        rope_theta=1e6,
        local_rope_theta=1e4,
        sliding_window=8,
        layer_types="LLG",
    ),
    "olmo2-tiny": dict(
        family="llama",
        d_model=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        norm_placement="out",
        qk_norm="full",
        norm_eps=1e-6,
    ),
    # Configs of published models (random init; weights come from dj.hf.load).
    "gpt2": dict(family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12),
    "llama-3.2-1b": dict(
        _LLAMA3,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        d_ff=8192,
        head_dim=64,
        tie_embeddings=True,
        rope_scaling=_rope_llama3(32.0),
    ),
    "llama-3.2-3b": dict(
        _LLAMA3,
        d_model=3072,
        n_layers=28,
        n_heads=24,
        d_ff=8192,
        head_dim=128,
        tie_embeddings=True,
        rope_scaling=_rope_llama3(32.0),
    ),
    "llama-3.1-8b": dict(
        _LLAMA3, d_model=4096, n_layers=32, n_heads=32, d_ff=14336, rope_scaling=_rope_llama3(8.0)
    ),
    "mistral-7b": dict(
        family="llama",
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=32768,
        norm_eps=1e-5,
        sliding_window=4096,
    ),
    "qwen2.5-0.5b": dict(
        family="llama",
        vocab_size=151936,
        d_model=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        d_ff=4864,
        max_seq_len=32768,
        qkv_bias=True,
        rope_theta=1e6,
        tie_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        family="llama",
        vocab_size=151936,
        d_model=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        d_ff=3072,
        max_seq_len=40960,
        qk_norm="head",
        rope_theta=1e6,
        tie_embeddings=True,
    ),
    "gemma-2-2b": dict(
        family="llama",
        vocab_size=256000,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        head_dim=256,
        d_ff=9216,
        max_seq_len=8192,
        **_GEMMA,
        embed_scale=2304**0.5,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=4096,
        layer_types="LG",
    ),
    "gemma-3-1b": dict(
        family="llama",
        vocab_size=262144,
        d_model=1152,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        d_ff=6912,
        max_seq_len=32768,
        **_GEMMA,
        embed_scale=1152**0.5,
        qk_norm="head",
        rope_theta=1e6,
        local_rope_theta=1e4,
        sliding_window=512,
        layer_types="LLLLLG",
    ),
    "olmo-2-1b": dict(
        family="llama",
        vocab_size=100352,
        d_model=2048,
        n_layers=16,
        n_heads=16,
        d_ff=8192,
        max_seq_len=4096,
        norm_placement="out",
        qk_norm="full",
        rope_theta=500000.0,
    ),
    "phi-3-mini": dict(
        family="llama",
        vocab_size=32064,
        d_model=3072,
        n_layers=32,
        n_heads=32,
        d_ff=8192,
        max_seq_len=4096,
        norm_eps=1e-5,
        sliding_window=2047,
    ),
}
_PRESETS["llama-1b"] = _PRESETS["llama-3.2-1b"]  # the name earlier releases used


def names() -> list[str]:
    return sorted(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset `name`, with any ModelConfig field overridden by keyword."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; known: {', '.join(names())}")
    return ModelConfig.from_dict({**_PRESETS[name], **overrides})
