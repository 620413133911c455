"""Rotary position embeddings: every RoPE variant the Hugging Face decoder families use.

A model has one or two RoPE *tables*: table 0 is `rope_theta` with the optional
`rope_scaling`, table 1 (only when `local_rope_theta` is set) is plain RoPE at that base,
used by the local ("L") rows of the block table (Gemma 3). Which table a row uses is
per-row data of the table (`depthjax.core.kinds`), gathered with the row at each step.

Variants (`RopeScaling.type`, named as in transformers' `rope_type`):

* ``linear``   frequencies divided by `factor` (position interpolation);
* ``llama3``   Llama 3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth
  ramp between (`low_freq_factor`, `high_freq_factor`, `original_max_seq_len`);
* ``yarn``     YaRN: per-frequency blend of interpolation and extrapolation plus an
  attention factor on cos/sin;
* ``dynamic``  dynamic NTK: the base grows with the sequence length once it exceeds
  `max_seq_len`;
* ``longrope`` Phi-3: per-frequency `short_factor` / `long_factor` (long once the sequence
  exceeds `original_max_seq_len`) and an attention factor.

The static variants are frequency tables computed once on the host. ``dynamic`` and
``longrope`` depend on the sequence length, which is read from the positions inside the
compiled function (max(positions) + 1, as transformers does on every forward call).
`rope_fraction` < 1 rotates only the first `head_dim * rope_fraction` dims (Phi, NeoX).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import DepthjaxError

TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
# Fields each type cannot do without (the rest have transformers' defaults).
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("original_max_seq_len",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
    "longrope": ("short_factor", "long_factor", "original_max_seq_len"),
}
# Fields each type reads (anything else set is a mistake worth an error).
_READS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": (
        "factor",
        "original_max_seq_len",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
    "llama3": _REQUIRED["llama3"],
    "longrope": (
        "short_factor",
        "long_factor",
        "original_max_seq_len",
        "factor",
        "attention_factor",
    ),
}


class RopeError(DepthjaxError):
    """A RoPE scaling description that is incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How table 0's frequencies are scaled. None fields take transformers' defaults."""

    type: str
    factor: float | None = None
    original_max_seq_len: int | None = None  # HF original_max_position_embeddings
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.type not in TYPES:
            raise RopeError(f"rope scaling type {self.type!r} is not one of {TYPES}")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        missing = [f for f in _REQUIRED[self.type] if getattr(self, f) is None]
        if missing:
            raise RopeError(f"rope scaling {self.type!r} needs {missing}")
        extra = [
            f.name
            for f in dataclasses.fields(self)
            if f.name != "type"
            and getattr(self, f.name) is not None
            and f.name not in _READS[self.type]
        ]
        if extra:
            raise RopeError(f"rope scaling {self.type!r} does not use {extra}")
        if self.factor is not None and self.factor <= 0:
            raise RopeError(f"rope scaling factor must be positive, got {self.factor}")

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()
            if v is not None
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RopeScaling:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RopeError(f"unknown rope scaling keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def rotary_dim(cfg) -> int:
    """Rotated dims of each head (the first ones; the rest pass through)."""
    return int(cfg.head_dim * cfg.rope_fraction)


def _plain(theta: float, dim: int) -> np.ndarray:
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _llama3(inv: np.ndarray, s: RopeScaling) -> np.ndarray:
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, s: RopeScaling, max_seq_len: int):
    factor = s.factor or max_seq_len / s.original_max_seq_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        attention = (
            mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
            if s.mscale and s.mscale_all_dim
            else mscale(factor)
        )

    def correction_dim(rotations):
        return (
            dim
            * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = _plain(theta, dim)
    return inv / factor * (1 - extrapolation) + inv * extrapolation, attention


def _longrope_attention(s: RopeScaling, max_seq_len: int) -> float:
    if s.attention_factor is not None:
        return s.attention_factor
    factor = s.factor or max_seq_len / s.original_max_seq_len
    return (
        1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(s.original_max_seq_len))
    )


@functools.lru_cache(maxsize=64)
def tables(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(inv_freq float32 [n_tables, R/2], attention factor float32 [n_tables]) before any
    sequence-length dependence (dynamic: the unscaled base; longrope: the short factors)."""
    dim, s = rotary_dim(cfg), cfg.rope_scaling
    inv, attention = _plain(cfg.rope_theta, dim), 1.0
    if s is not None:
        if s.type == "linear":
            inv = inv / s.factor
        elif s.type == "llama3":
            inv = _llama3(inv, s)
        elif s.type == "yarn":
            inv, attention = _yarn(cfg.rope_theta, dim, s, cfg.max_seq_len)
        elif s.type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != dim // 2:
                    raise RopeError(
                        f"longrope {name} has {len(getattr(s, name))} entries; "
                        f"the rotary dim {dim} needs {dim // 2}"
                    )
            inv = inv / np.asarray(s.short_factor)
            attention = _longrope_attention(s, cfg.max_seq_len)
    invs, factors = [inv], [attention]
    if cfg.local_rope_theta is not None:
        invs.append(_plain(cfg.local_rope_theta, dim))
        factors.append(1.0)
    return np.asarray(invs, np.float32), np.asarray(factors, np.float32)


def _length_dependent(cfg, inv0_F, positions_BT):
    """Table 0's frequencies for this call's sequence length (dynamic NTK, longrope)."""
    s, dim = cfg.rope_scaling, rotary_dim(cfg)
    length = jnp.max(positions_BT).astype(jnp.float32) + 1
    if s.type == "dynamic":
        # base * ratio ** (dim / (dim - 2)), folded into the frequencies of the plain base
        length = jnp.maximum(length, cfg.max_seq_len)
        ratio = s.factor * length / cfg.max_seq_len - (s.factor - 1)
        exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / (dim - 2)
        return inv0_F * ratio**-exponent
    long = _plain(cfg.rope_theta, dim) / np.asarray(s.long_factor)
    return jnp.where(length > s.original_max_seq_len, jnp.asarray(long, jnp.float32), inv0_F)


def cos_sin(cfg, positions_BT, table=None):
    """cos, sin float32 [B, T, R/2] (attention factor included) of RoPE table `table`
    (an int, possibly traced; None is table 0) at `positions_BT`."""
    inv_NF, attention_N = tables(cfg)
    inv_F, attention = jnp.asarray(inv_NF[0]), float(attention_N[0])
    if cfg.rope_scaling is not None and cfg.rope_scaling.type in ("dynamic", "longrope"):
        inv_F = _length_dependent(cfg, inv_F, positions_BT)
    if table is not None and len(inv_NF) > 1:
        local = jnp.asarray(table) != 0
        inv_F = jnp.where(local, jnp.asarray(inv_NF[1]), inv_F)
        attention = jnp.where(local, attention_N[1], attention_N[0])
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_F
    return jnp.cos(angle_BTF) * attention, jnp.sin(angle_BTF) * attention


def apply_rope(x_BTHD, cos_BTF, sin_BTF):
    """Rotate the first 2F dims of each head, half-split convention (HF `rotate_half`)."""
    rot = 2 * cos_BTF.shape[-1]
    x = x_BTHD.astype(jnp.float32)
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    cos, sin = cos_BTF[:, :, None], sin_BTF[:, :, None]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BTHD.dtype)
