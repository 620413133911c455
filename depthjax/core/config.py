"""ModelConfig: the static description of a model (everything except weights and program).

A config is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`.
Fields left as `None` take the default of the chosen `family`:

* ``llama``: RMSNorm, RoPE, SwiGLU, no biases, pre-norm, causal. The decoder families of
  Hugging Face are options of it: Mistral and Phi-3 (``sliding_window``), Qwen2
  (``qkv_bias=True``), Qwen3 (``qk_norm="head"``, explicit ``head_dim``), Gemma 2/3
  (``norm_placement="peri"``, ``mlp="geglu"``, ``embed_scale``, soft-capping,
  ``query_scale_dim``, ``layer_types``), OLMo 2 (``norm_placement="out"``,
  ``qk_norm="full"``);
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

from ..errors import DepthjaxError
from .rope import RopeError, RopeScaling

FAMILIES = ("llama", "gpt2", "bert")
NORM_PLACEMENTS = ("pre", "post", "peri", "out")
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "geglu", "gelu", "gelu_tanh")
QK_NORMS = (None, "head", "full")
LAYER_TYPES = "GL"  # per table row: G global attention, L local (sliding window, local RoPE)
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


class ConfigError(DepthjaxError):
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
    d_ff: int | None = None  # None: 4 * d_model (gelu) or 8/3 * d_model rounded to 8 (gated)
    max_seq_len: int = 1024  # size of the learned position table
    # Family-dependent (None: the family default, see module docstring).
    norm: str | None = None
    norm_eps: float | None = None
    norm_placement: str | None = None  # "pre" | "post" | "peri" (normalize sublayer in and
    # out, Gemma) | "out" (normalize sublayer out, OLMo 2)
    position: str | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # linear | dynamic | yarn | llama3 | longrope
    rope_fraction: float = 1.0  # rotated share of head_dim (partial rotary, Phi/NeoX)
    local_rope_theta: float | None = None  # plain RoPE base of "L" rows (Gemma 3); None: rope_theta
    sliding_window: int | None = None  # keys a query of an "L" row sees, itself included
    layer_types: str | None = None  # one letter per table row, "G" global or "L" local; a
    # shorter string repeats ("LLLLLG"); None: all "L" if
    # sliding_window else all "G"
    mlp: str | None = None
    bias: bool | None = None  # biases on the output projection and MLP
    qkv_bias: bool | None = None  # biases on q, k, v (Qwen2: True with bias=False)
    qk_norm: str | None = None  # RMSNorm on q and k before RoPE: "head" (per head,
    # Qwen3, Gemma 3) or "full" (whole projection, OLMo 2)
    query_scale_dim: float | None = None  # scores scale by query_scale_dim ** -0.5 (None:
    # head_dim; Gemma's query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits (Gemma 2)
    embed_scale: float | None = None  # token embeddings multiplied by this (Gemma: sqrt(d_model))
    tie_embeddings: bool | None = None
    causal: bool | None = None
    type_vocab_size: int | None = None  # token types (BERT segments); 0 disables
    embed_norm: bool | None = None  # norm right after the embeddings (BERT)
    final_norm: bool | None = None  # norm before the output head
    parallel_block: bool = False  # GPT-J block: attention and MLP read the same input
    # Execution.
    attention_impl: str = "xla"  # "auto" | "xla" | "cudnn" | "pallas" (depthjax.core.attention)
    attention_chunk: int = 512  # xla attention runs in query x key blocks of this size when
    # T * S > 4 * attention_chunk ** 2 (depthjax.core.blockwise); 0: always dense scores
    dtype: str = "float32"  # compute dtype (activations, matmuls)
    param_dtype: str = "float32"  # storage dtype of the weights: float32 master weights for
    # training; bfloat16 halves memory for inference and analysis (logits and losses stay
    # float32 either way)
    remat: Remat = Remat.NONE
    init_std: float = 0.02

    def __post_init__(self):
        _choice("family", self.family, FAMILIES)
        for key, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if isinstance(self.qk_norm, bool):  # older configs: qk_norm=True meant per head
            object.__setattr__(self, "qk_norm", "head" if self.qk_norm else None)
        if isinstance(self.rope_scaling, Mapping):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
            except RopeError as e:
                raise ConfigError(str(e)) from None
        if self.layer_types is not None or self.sliding_window is not None:
            object.__setattr__(
                self,
                "layer_types",
                _expand_layer_types(self.layer_types, self.sliding_window, self.n_layers),
            )
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
        if self.query_scale_dim is not None and self.query_scale_dim == self.head_dim:
            object.__setattr__(self, "query_scale_dim", None)  # the default scale
        if self.d_ff is None:
            gated = self.mlp in ("swiglu", "geglu")
            d_ff = -(-8 * self.d_model // 3 // 8) * 8 if gated else 4 * self.d_model
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
        _choice("param_dtype", self.param_dtype, DTYPES)
        _choice("qk_norm", self.qk_norm, QK_NORMS)
        if self.attention_chunk < 0:
            raise ConfigError(
                f"attention_chunk must be >= 0 (0: dense attention), got {self.attention_chunk}"
            )
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
        head_dim = self.head_dim or self.d_model // self.n_heads
        if self.position == "rope":
            if not 0.0 < self.rope_fraction <= 1.0:
                raise ConfigError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
            rotary = int(head_dim * self.rope_fraction)
            if rotary < 2 or rotary % 2:
                raise ConfigError(
                    f"RoPE needs an even number of rotated dims, got "
                    f"head_dim * rope_fraction = {rotary}"
                )
        elif self.rope_scaling is not None or self.local_rope_theta is not None:
            raise ConfigError(
                f"rope_scaling / local_rope_theta need position='rope', got {self.position!r}"
            )
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ConfigError(
                    f"sliding_window must be a positive integer, got {self.sliding_window!r}"
                )
            if not self.causal:
                raise ConfigError("sliding_window needs a causal model (windows look back)")
        for name in ("attn_softcap", "final_softcap", "embed_scale", "query_scale_dim"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{name} must be a positive number or None, got {value!r}")
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

    @property
    def local_rows(self) -> tuple[int, ...]:
        """Table rows with local attention (a sliding window and the local RoPE)."""
        return tuple(i for i, t in enumerate(self.layer_types or "") if t == "L")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["remat"] = self.remat.value
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_dict()
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
    RopeScaling: "a RoPE scaling (a mapping with rope_type)",
}


def _expand_layer_types(pattern: str | None, window: int | None, n_layers: int) -> str | None:
    """The per-row string of length n_layers ("G"/"L") from a pattern that may repeat."""
    if pattern is None:
        pattern = "L"
    if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_TYPES):
        raise ConfigError(
            f"layer_types must be a string of 'G' (global) and 'L' (local) letters, got {pattern!r}"
        )
    if len(pattern) > n_layers:
        raise ConfigError(
            f"layer_types has {len(pattern)} letters for n_layers={n_layers}; "
            "give one letter per table row (or a shorter repeating pattern)"
        )
    if "L" in pattern and window is None:
        raise ConfigError(f"layer_types={pattern!r} has local rows but sliding_window is None")
    if "L" not in pattern and window is None:
        return None  # every row global: the plain causal fast path
    return (pattern * -(-n_layers // len(pattern)))[:n_layers]


def _check_keys(d: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown ModelConfig key {key!r}{hint}")
