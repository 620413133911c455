"""Reusable Flax linen layers: norms, attention (with RoPE, see depthjax.core.rope), MLP.

Each is an ordinary `nn.Module` configured by a `ModelConfig`, usable outside depthjax:

    attn = Attention(cfg)
    params = attn.init(key, x_BTD, positions_BT)["params"]
    y_BTD = attn.apply({"params": params}, x_BTD, positions_BT)

Parameters are stored in `cfg.param_dtype` (float32 by default); computation runs in
`cfg.dtype`. Parameter names are fixed
(q, k, v, o, gate, up, down, scale, bias): checkpoint import and sharding rules rely on them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import rope as rope_lib
from .attention import attend
from .config import ModelConfig


def init_normal(cfg: ModelConfig):
    """N(0, init_std) drawn in float32 and rounded to the parameter dtype, so a model
    initialized in bfloat16 equals the float32 one cast (same key, same values)."""
    draw = nn.initializers.normal(cfg.init_std)
    return lambda key, shape, dtype=jnp.float32: draw(key, shape, jnp.float32).astype(dtype)


def make_norm(cfg: ModelConfig, name: str, *, kind: str | None = None, axes: int = 1) -> nn.Module:
    """RMSNorm or LayerNorm (with bias) over the last `axes` axes, reducing in float32."""
    over = tuple(range(-axes, 0))
    if (kind or cfg.norm) == "rms":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            reduction_axes=over,
            feature_axes=over,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        reduction_axes=over,
        feature_axes=over,
        name=name,
    )


def rope(x_BTHD, positions_BT, theta: float):
    """Plain rotary position embedding at base `theta` (half-split, as HF `rotate_half`);
    models use `depthjax.core.rope` (scaled variants, partial rotary, per-row tables)."""
    inv_F = 1.0 / theta ** (
        jnp.arange(0, x_BTHD.shape[-1], 2, dtype=jnp.float32) / x_BTHD.shape[-1]
    )
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_F
    return rope_lib.apply_rope(x_BTHD, jnp.cos(angle_BTF), jnp.sin(angle_BTF))


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention. Kernels: q [D,H,Dh], k,v [D,K,Dh], o [H,Dh,D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD,
        positions_BT,
        *,
        segment_ids_BT=None,
        kv_mask_BT=None,
        kv_cache=None,
        window=None,
        rope_table=None,
    ):
        """Returns y [B, T, D]; with `kv_cache` (a depthjax.inference.kv_cache.StepCache), returns
        (y, kv_cache) after writing this call's keys/values and attending over the cache.

        window: int (may be traced), query t sees keys s with t - s < window (this row's
        sliding window; None: no window). rope_table: this row's RoPE table (depthjax.core.rope).
        """
        cfg = self.cfg
        dense = lambda heads, name, bias: nn.DenseGeneral(
            (heads, cfg.head_dim),
            use_bias=bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=init_normal(cfg),
            name=name,
        )
        q_BTHD = dense(cfg.n_heads, "q", cfg.qkv_bias)(x_BTD)
        k_BTKD = dense(cfg.n_kv_heads, "k", cfg.qkv_bias)(x_BTD)
        v_BTKD = dense(cfg.n_kv_heads, "v", cfg.qkv_bias)(x_BTD)
        if cfg.qk_norm:  # per head, or over the whole projection (heads x head_dim)
            axes = 2 if cfg.qk_norm == "full" else 1
            q_BTHD = make_norm(cfg, "q_norm", kind="rms", axes=axes)(q_BTHD)
            k_BTKD = make_norm(cfg, "k_norm", kind="rms", axes=axes)(k_BTKD)
        if cfg.position == "rope":
            cos, sin = rope_lib.cos_sin(cfg, positions_BT, rope_table)
            q_BTHD = rope_lib.apply_rope(q_BTHD, cos, sin)
            k_BTKD = rope_lib.apply_rope(k_BTKD, cos, sin)
        causal, k_BSKD, v_BSKD, kv_mask_BS = cfg.causal, k_BTKD, v_BTKD, kv_mask_BT
        if kv_cache is not None:
            kv_cache, k_BSKD, v_BSKD, kv_mask_BS, causal, window = kv_cache.update(
                k_BTKD, v_BTKD, kv_mask_BT, causal, window=window, positions_BT=positions_BT
            )
        scale = None if cfg.query_scale_dim is None else cfg.query_scale_dim**-0.5
        out_BTHD = attend(
            q_BTHD,
            k_BSKD,
            v_BSKD,
            causal=causal,
            segment_ids_BT=segment_ids_BT,
            kv_mask_BS=kv_mask_BS,
            scale=scale,
            window=window,
            softcap=cfg.attn_softcap,
            impl=cfg.attention_impl,
            chunk=cfg.attention_chunk,
        )
        y_BTD = nn.DenseGeneral(
            cfg.d_model,
            axis=(-2, -1),
            use_bias=cfg.bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=init_normal(cfg),
            name="o",
        )(out_BTHD)
        return y_BTD if kv_cache is None else (y_BTD, kv_cache)


class MLP(nn.Module):
    """SwiGLU / GeGLU (gate, up, down) or GELU (up, down) feed-forward. Kernels [D,F], [F,D].

    GeGLU gates with the tanh-approximate GELU (Gemma's gelu_pytorch_tanh)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        dense = lambda features, name: nn.Dense(
            features,
            use_bias=cfg.bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=init_normal(cfg),
            name=name,
        )
        if cfg.mlp in ("swiglu", "geglu"):
            act = nn.silu if cfg.mlp == "swiglu" else lambda g: jax.nn.gelu(g, approximate=True)
            h_BTF = act(dense(cfg.d_ff, "gate")(x_BTD)) * dense(cfg.d_ff, "up")(x_BTD)
        else:
            h_BTF = jax.nn.gelu(dense(cfg.d_ff, "up")(x_BTD), approximate=cfg.mlp == "gelu_tanh")
        return dense(cfg.d_model, "down")(h_BTF)
