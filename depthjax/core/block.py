"""Block: one transformer layer, written as two gated residual *updates*.

Every norm placement is expressed as `x_next = x + attn_gate * u_attn` followed by
`out = x_next + mlp_gate * u_mlp`, so a gate of 0 removes a sublayer exactly (for
post-norm too: its norm goes with it) and the traced updates add up to the residual.

* pre:  u = f(norm(x))
* peri: u = out_norm(f(norm(x)))            (normalize sublayer input and output, Gemma)
* out:  u = out_norm(f(x))                   (normalize sublayer output only, OLMo 2)
* post: u = norm(x + f(x)) - x               (BERT)
* parallel_block (pre only, GPT-J): attention and MLP both read norm(x).

`Block` is an ordinary Flax module (both sublayers always run). The model walks its table
with `step_updates`, the same composition on a parameter row where a sublayer whose gate
is 0 is not computed (see depthjax.core.gating).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import ModelConfig
from .gating import gated
from .layers import MLP, Attention, make_norm


class Block(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.attn = Attention(cfg, name="attn")
        self.mlp = MLP(cfg, name="mlp")
        self.attn_norm = make_norm(cfg, "attn_norm")
        if not cfg.parallel_block:
            self.mlp_norm = make_norm(cfg, "mlp_norm")
        if cfg.norm_placement in ("peri", "out"):
            self.attn_out_norm = make_norm(cfg, "attn_out_norm")
            self.mlp_out_norm = make_norm(cfg, "mlp_out_norm")

    def attn_update(
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
        """The attention sublayer's ungated update u_attn [B, T, D] (the block adds
        attn_gate * u_attn); with `kv_cache` (see `Attention`) returns (u_attn, kv_cache).
        window / rope_table: this row's attention kind (depthjax.core.kinds, `Attention`)."""
        cfg = self.cfg
        x_BTD = x_BTD.astype(cfg.dtype)
        cache = [kv_cache]  # attn swaps in the updated cache

        def attn(h_BTD):
            out = self.attn(
                h_BTD,
                positions_BT,
                segment_ids_BT=segment_ids_BT,
                kv_mask_BT=kv_mask_BT,
                kv_cache=kv_cache,
                window=window,
                rope_table=rope_table,
            )
            if kv_cache is None:
                return out
            y_BTD, cache[0] = out
            return y_BTD

        if cfg.norm_placement == "post":
            u_BTD = self.attn_norm(x_BTD + attn(x_BTD)) - x_BTD
        elif cfg.norm_placement == "out":
            u_BTD = self.attn_out_norm(attn(x_BTD))
        else:
            u_BTD = attn(self.attn_norm(x_BTD))
            if cfg.norm_placement == "peri":
                u_BTD = self.attn_out_norm(u_BTD)
        return u_BTD if kv_cache is None else (u_BTD, cache[0])

    def mlp_update(self, h_BTD):
        """The MLP sublayer's ungated update on its input h [B, T, D]: the residual after
        the gated attention update (for a parallel block, the block input itself)."""
        cfg = self.cfg
        h_BTD = h_BTD.astype(cfg.dtype)
        if cfg.parallel_block:
            return self.mlp(self.attn_norm(h_BTD))
        if cfg.norm_placement == "post":
            return self.mlp_norm(h_BTD + self.mlp(h_BTD)) - h_BTD
        if cfg.norm_placement == "out":
            return self.mlp_out_norm(self.mlp(h_BTD))
        u_BTD = self.mlp(self.mlp_norm(h_BTD))
        return self.mlp_out_norm(u_BTD) if cfg.norm_placement == "peri" else u_BTD

    def __call__(self, x_BTD, attn_gate, mlp_gate, positions_BT, **attn_kwargs):
        """Returns the gated updates (u_attn_BTD, u_mlp_BTD); the block output is x + both.
        With `kv_cache` (see `Attention`) returns (u_attn_BTD, u_mlp_BTD, kv_cache)."""
        cfg = self.cfg
        out = self.attn_update(x_BTD, positions_BT, **attn_kwargs)
        u_attn, cache = out if attn_kwargs.get("kv_cache") is not None else (out, None)
        u_attn = jnp.asarray(attn_gate, cfg.dtype) * u_attn
        u_mlp = jnp.asarray(mlp_gate, cfg.dtype) * self.mlp_update(mlp_input(cfg, x_BTD, u_attn))
        return (u_attn, u_mlp) if cache is None else (u_attn, u_mlp, cache)


def mlp_input(cfg: ModelConfig, x_BTD, u_attn_BTD):
    """What the MLP sublayer reads: x + the gated attention update (x for a parallel block)."""
    x_BTD = x_BTD.astype(cfg.dtype)
    return x_BTD if cfg.parallel_block else x_BTD + u_attn_BTD


def step_updates(
    cfg: ModelConfig,
    row: dict,
    x_BTD,
    attn_gate,
    mlp_gate,
    positions_BT,
    *,
    attn: bool | None = None,
    mlp: bool | None = None,
    kv_cache=None,
    **attn_kwargs,
):
    """`Block(cfg).apply({"params": row}, x, attn_gate, mlp_gate, positions)`, computing
    only the sublayers that run. Returns (u_attn, u_mlp) (+ kv_cache when one is given).

    attn / mlp say when a sublayer runs: None = when its gate is not 0, decided at run
    time (one compiled function serves every gate; see depthjax.core.gating); True = always
    (gate times update); False = never (statically: the caller knows its gate is 0).
    With a `kv_cache`, `attn` must be static (the cache write happens or it does not).
    """
    zero = lambda: jnp.zeros(x_BTD.shape, cfg.dtype)
    block = Block(cfg)

    def attn_fn(row, x_BTD, positions_BT, attn_kwargs):
        return block.apply(
            {"params": row}, x_BTD, positions_BT, method=Block.attn_update, **attn_kwargs
        )

    def mlp_fn(row, h_BTD):
        return block.apply({"params": row}, h_BTD, method=Block.mlp_update)

    cache = kv_cache
    if attn is False:
        u_attn = zero()
    elif kv_cache is not None:
        if attn is None:
            raise ValueError("step_updates with a kv_cache needs a static attn=True/False")
        u_attn, cache = attn_fn(row, x_BTD, positions_BT, dict(attn_kwargs, kv_cache=kv_cache))
        u_attn = jnp.asarray(attn_gate, cfg.dtype) * u_attn
    elif attn is None:
        u_attn = gated(attn_gate, attn_fn, row, x_BTD, positions_BT, attn_kwargs)
    else:
        u_attn = jnp.asarray(attn_gate, cfg.dtype) * attn_fn(row, x_BTD, positions_BT, attn_kwargs)
    h_BTD = mlp_input(cfg, x_BTD, u_attn)
    if mlp is False:
        u_mlp = zero()
    elif mlp is None:
        u_mlp = gated(mlp_gate, mlp_fn, row, h_BTD)
    else:
        u_mlp = jnp.asarray(mlp_gate, cfg.dtype) * mlp_fn(row, h_BTD)
    return (u_attn, u_mlp) if kv_cache is None else (u_attn, u_mlp, cache)
