"""Reusable Flax linen layers: norms, rotary embeddings, attention, MLP.

Each is an ordinary `nn.Module` configured by a `ModelConfig`, usable outside depthjax:

    attn = Attention(cfg)
    params = attn.init(key, x_BTD, positions_BT)["params"]
    y_BTD = attn.apply({"params": params}, x_BTD, positions_BT)

Parameters are float32; computation runs in `cfg.dtype`. Parameter names are fixed
(q, k, v, o, gate, up, down, scale, bias): checkpoint import and sharding rules rely on them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import attend
from .config import ModelConfig


def init_normal(cfg: ModelConfig):
    return nn.initializers.normal(cfg.init_std)


def make_norm(cfg: ModelConfig, name: str, *, kind: str | None = None) -> nn.Module:
    """RMSNorm or LayerNorm (with bias) over the last axis, reducing in float32."""
    if (kind or cfg.norm) == "rms":
        return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, use_fast_variance=False, name=name)


def rope(x_BTHD, positions_BT, theta: float):
    """Rotary position embedding, half-split convention (as in Llama/HF `rotate_half`)."""
    half = x_BTHD.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angle_BTF)[:, :, None], jnp.sin(angle_BTF)[:, :, None]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention. Kernels: q [D,H,Dh], k,v [D,K,Dh], o [H,Dh,D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, *, segment_ids_BT=None, kv_mask_BT=None, kv_cache=None):
        """Returns y [B, T, D]; with `kv_cache` (a depthjax.kv_cache.StepCache), returns
        (y, kv_cache) after writing this call's keys/values and attending over the cache."""
        cfg = self.cfg
        dense = lambda heads, name, bias: nn.DenseGeneral(
            (heads, cfg.head_dim),
            use_bias=bias,
            dtype=cfg.dtype,
            kernel_init=init_normal(cfg),
            name=name,
        )
        q_BTHD = dense(cfg.n_heads, "q", cfg.qkv_bias)(x_BTD)
        k_BTKD = dense(cfg.n_kv_heads, "k", cfg.qkv_bias)(x_BTD)
        v_BTKD = dense(cfg.n_kv_heads, "v", cfg.qkv_bias)(x_BTD)
        if cfg.qk_norm:
            q_BTHD = make_norm(cfg, "q_norm", kind="rms")(q_BTHD)
            k_BTKD = make_norm(cfg, "k_norm", kind="rms")(k_BTKD)
        if cfg.position == "rope":
            q_BTHD = rope(q_BTHD, positions_BT, cfg.rope_theta)
            k_BTKD = rope(k_BTKD, positions_BT, cfg.rope_theta)
        causal, k_BSKD, v_BSKD, kv_mask_BS = cfg.causal, k_BTKD, v_BTKD, kv_mask_BT
        if kv_cache is not None:
            kv_cache, k_BSKD, v_BSKD, kv_mask_BS, causal = kv_cache.update(
                k_BTKD, v_BTKD, kv_mask_BT, causal
            )
        out_BTHD = attend(
            q_BTHD,
            k_BSKD,
            v_BSKD,
            causal=causal,
            segment_ids_BT=segment_ids_BT,
            kv_mask_BS=kv_mask_BS,
            impl=cfg.attention_impl,
        )
        y_BTD = nn.DenseGeneral(
            cfg.d_model,
            axis=(-2, -1),
            use_bias=cfg.bias,
            dtype=cfg.dtype,
            kernel_init=init_normal(cfg),
            name="o",
        )(out_BTHD)
        return y_BTD if kv_cache is None else (y_BTD, kv_cache)


class MLP(nn.Module):
    """SwiGLU (gate, up, down) or GELU (up, down) feed-forward. Kernels [D,F] and [F,D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        dense = lambda features, name: nn.Dense(
            features, use_bias=cfg.bias, dtype=cfg.dtype, kernel_init=init_normal(cfg), name=name
        )
        if cfg.mlp == "swiglu":
            h_BTF = nn.silu(dense(cfg.d_ff, "gate")(x_BTD)) * dense(cfg.d_ff, "up")(x_BTD)
        else:
            h_BTF = jax.nn.gelu(dense(cfg.d_ff, "up")(x_BTD), approximate=cfg.mlp == "gelu_tanh")
        return dense(cfg.d_model, "down")(h_BTF)
