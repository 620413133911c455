"""ModelConfig: the static description of a model (everything except weights and program).

A config is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`.
Fields left as `None` take the default of the chosen `family`:

* ``llama``: RMSNorm, RoPE, SwiGLU, no biases, pre-norm, causal (also Mistral, Qwen2 via
  ``qkv_bias=True``, Qwen3 via ``qk_norm=True`` and an explicit ``head_dim``);
* ``gpt2``: LayerNorm with bias, learned positions, GELU (tanh) MLP, biases everywhere,
  tied embeddings, pre-norm, causal;
* ``bert``: bidirectional encoder, post-norm, LayerNorm after the embeddings, token
  types, learned positions, exact GELU, biases everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import typing
from collections.abc import Mapping
from typing import Any

FAMILIES = ("llama", "gpt2", "bert")
NORM_PLACEMENTS = ("pre", "post", "peri")
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu", "gelu_tanh")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")  # see depthjax/attention.py
DTYPES = ("float32", "bfloat16", "float16")


class Remat(enum.StrEnum):
    """What the backward pass keeps from each step's forward (see `jax.checkpoint`).

    NONE keeps everything; FULL recomputes the whole step; DOTS keeps matmul outputs;
    DOTS_NO_BATCH keeps only matmuls without batch dimensions (the weight matmuls).
    """

    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_NO_BATCH = "dots_no_batch"


_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        norm="rms",
        norm_eps=1e-6,
        norm_placement="pre",
        position="rope",
        mlp="swiglu",
        bias=False,
        qkv_bias=False,
        tie_embeddings=False,
        causal=True,
        type_vocab_size=0,
        embed_norm=False,
        final_norm=True,
    ),
    "gpt2": dict(
        norm="layer",
        norm_eps=1e-5,
        norm_placement="pre",
        position="learned",
        mlp="gelu_tanh",
        bias=True,
        qkv_bias=True,
        tie_embeddings=True,
        causal=True,
        type_vocab_size=0,
        embed_norm=False,
        final_norm=True,
    ),
    "bert": dict(
        norm="layer",
        norm_eps=1e-12,
        norm_placement="post",
        position="learned",
        mlp="gelu",
        bias=True,
        qkv_bias=True,
        tie_embeddings=True,
        causal=False,
        type_vocab_size=2,
        embed_norm=True,
        final_norm=False,
    ),
}


class ConfigError(ValueError):
    """A ModelConfig (or config dictionary) that cannot describe a model."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4  # rows of the block table (and steps of the default program)
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (multi-head); fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 d_model (gelu), 8/3 d_model rounded to 8 (swiglu)
    max_seq_len: int = 1024  # size of the learned position table
    # Family-dependent (None: the family default, see module docstring).
    norm: str | None = None
    norm_eps: float | None = None
    norm_placement: str | None = None  # "pre" | "post" | "peri" (normalize sublayer in and out)
    position: str | None = None
    rope_theta: float = 10000.0
    mlp: str | None = None
    bias: bool | None = None  # biases on the output projection and MLP
    qkv_bias: bool | None = None  # biases on q, k, v (Qwen2: True with bias=False)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_embeddings: bool | None = None
    causal: bool | None = None
    type_vocab_size: int | None = None  # token types (BERT segments); 0 disables
    embed_norm: bool | None = None  # norm right after the embeddings (BERT)
    final_norm: bool | None = None  # norm before the output head
    parallel_block: bool = False  # GPT-J block: attention and MLP read the same input
    # Execution.
    attention_impl: str = "xla"  # "auto" | "xla" | "cudnn" | "pallas" (depthjax.attention)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: Remat = Remat.NONE
    init_std: float = 0.02

    def __post_init__(self):
        _choice("family", self.family, FAMILIES)
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.remat, str):
            try:
                object.__setattr__(self, "remat", Remat(self.remat))
            except ValueError:
                raise ConfigError(
                    f"remat={self.remat!r} is not one of {tuple(r.value for r in Remat)}"
                ) from None
        self._check_types()
        self._validate()
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.d_ff is None:
            d_ff = 4 * self.d_model if self.mlp != "swiglu" else -(-8 * self.d_model // 3 // 8) * 8
            object.__setattr__(self, "d_ff", d_ff)

    def _check_types(self) -> None:
        """Every field has its annotated type (an int field takes no bool, a float field
        takes an int as a float): '64' or True where a number belongs is a mistake."""
        import numpy as np

        for name, (base, optional) in _field_types().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, np.generic):  # numpy scalars from computed configs
                value = value.item()
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, base) or (base in (int, float) and isinstance(value, bool)):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} must be {_TYPE_NAMES[base]}"
                    f"{' or None' if optional else ''}"
                )
            object.__setattr__(self, name, value)

    def _validate(self) -> None:
        _choice("norm", self.norm, NORMS)
        _choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("position", self.position, POSITIONS)
        _choice("mlp", self.mlp, MLPS)
        _choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _choice("dtype", self.dtype, DTYPES)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_heads="
                f"{self.n_heads}; set head_dim explicitly"
            )
        if self.position == "rope" and (self.head_dim or self.d_model // self.n_heads) % 2:
            raise ConfigError("RoPE needs an even head_dim")
        if self.parallel_block and self.norm_placement != "pre":
            raise ConfigError(
                f"parallel_block=True needs norm_placement='pre', got {self.norm_placement!r}"
            )
        if self.type_vocab_size < 0:
            raise ConfigError("type_vocab_size must be >= 0")
        for name, positive in (("rope_theta", True), ("norm_eps", False), ("init_std", False)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ConfigError(
                    f"{name}={value!r} must be a finite number {'> 0' if positive else '>= 0'}"
                )
        for name in ("head_dim", "d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    # -- conversion -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.n_layers

    def replace(self, **changes) -> ModelConfig:
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["remat"] = self.remat.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        _check_keys(d)
        return cls(**d)


@functools.cache
def _field_types() -> dict[str, tuple[type, bool]]:
    """{field: (type, None allowed)} from ModelConfig's annotations."""
    out = {}
    for name, tp in typing.get_type_hints(ModelConfig).items():
        args = typing.get_args(tp)
        out[name] = (next(a for a in args if a is not type(None)), True) if args else (tp, False)
    return out


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    Remat: "a Remat",
}


def _check_keys(d: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown ModelConfig key {key!r}{hint}")
