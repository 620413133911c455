"""Model FLOPs per token and peak device FLOP/s, for model FLOPs utilization (MFU).

Counts follow the PaLM convention: a training step costs 3x the forward (forward plus a
backward of twice the cost); every matmul of shape [m, k] x [k, n] costs 2mkn; attention
scores and values cost 2 * 2 * T * H * Dh per token and layer, counted in full (no
causal halving, which is what the XLA attention computes). Recomputation from remat is
not counted: this is MFU, not hardware utilization. `train_flops_per_token` counts every
step of a depth; `forward_flops_per_token` counts what a program runs (a sublayer whose gate
is 0 is skipped, see depthjax.core.gating).
"""

from __future__ import annotations

import jax
import numpy as np

from .config import ModelConfig

# Dense peak FLOP/s per chip: (bfloat16/float16, float32) from vendor data sheets; float32
# on NVIDIA is TF32 tensor-core throughput, which XLA uses for float32 matmuls by default.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; the PCIe card is ~25% lower
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v6": (918e12, 918e12),  # v6e (Trillium)
    "TPU v5p": (459e12, 459e12),
    "TPU v5": (197e12, 197e12),  # v5e / "TPU v5 lite"
    "TPU v4": (275e12, 275e12),
}


def sublayer_matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(attention, MLP) weights one step's sublayers pass every token through."""
    D, Dh, H, K, F = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    return D * (H + 2 * K) * Dh + H * Dh * D, (3 if cfg.mlp in ("swiglu", "geglu") else 2) * D * F


def matmul_params_per_token(cfg: ModelConfig, depth: int | None = None) -> int:
    """Weights every token passes through in matmuls (embedding lookups excluded)."""
    attn, mlp = sublayer_matmul_params(cfg)
    return (cfg.depth if depth is None else depth) * (attn + mlp) + cfg.d_model * cfg.vocab_size


def sublayer_forward_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs per token of one step's (attention, MLP) sublayer at `seq_len`
    (attention includes its scores and values, counted in full)."""
    attn, mlp = sublayer_matmul_params(cfg)
    return 2.0 * attn + 4.0 * seq_len * cfg.n_heads * cfg.head_dim, 2.0 * mlp


def sublayer_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one attention sublayer, one MLP sublayer and the head."""
    attn, mlp = sublayer_forward_flops(cfg, seq_len)
    return {"attn": attn, "mlp": mlp, "head": 2.0 * cfg.d_model * cfg.vocab_size}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, program) -> float:
    """Forward FLOPs per token of `program` (concrete): only sublayers whose gate is not 0."""
    f = sublayer_flops_per_token(cfg, seq_len)
    n_attn = int(np.count_nonzero(np.asarray(program.attn)))
    n_mlp = int(np.count_nonzero(np.asarray(program.mlp)))
    return n_attn * f["attn"] + n_mlp * f["mlp"] + f["head"]


def train_flops_per_token(cfg: ModelConfig, seq_len: int, depth: int | None = None) -> float:
    """Forward + backward FLOPs per trained token at sequence length `seq_len`."""
    depth = cfg.depth if depth is None else depth
    f = sublayer_flops_per_token(cfg, seq_len)
    return 3.0 * (depth * (f["attn"] + f["mlp"]) + f["head"])


def peak_flops(device=None, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of one device for `dtype`, or None when the device is not in the
    table (CPUs, unknown accelerators): MFU is then reported as null."""
    kind = (device or jax.devices()[0]).device_kind
    for name, (low, full) in PEAK_FLOPS.items():  # longest names first where they overlap
        if name.lower() in kind.lower():
            return full if dtype == "float32" else low
    return None
