"""Block: one transformer layer, written as two gated residual *updates*.

Every norm placement is expressed as `x_next = x + attn_gate * u_attn` followed by
`out = x_next + mlp_gate * u_mlp`, so a gate of 0 removes a sublayer exactly (for
post-norm too: its norm goes with it) and the traced updates add up to the residual.

* pre:  u = f(norm(x))
* peri: u = out_norm(f(norm(x)))            (normalize sublayer input and output)
* post: u = norm(x + f(x)) - x               (BERT)
* parallel_block (pre only, GPT-J): attention and MLP both read norm(x).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import ModelConfig
from .layers import MLP, Attention, make_norm


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, attn_gate, mlp_gate, positions_BT, *, segment_ids_BT=None,
                 kv_mask_BT=None):
        """Returns the gated updates (u_attn_BTD, u_mlp_BTD); the block output is x + both."""
        cfg = self.cfg
        attn = Attention(cfg, name="attn")
        mlp = MLP(cfg, name="mlp")
        attn_norm = make_norm(cfg, "attn_norm")
        run_attn = lambda h: attn(h, positions_BT, segment_ids_BT=segment_ids_BT,
                                  kv_mask_BT=kv_mask_BT)
        x_BTD = x_BTD.astype(cfg.dtype)
        attn_gate, mlp_gate = (jnp.asarray(g, cfg.dtype) for g in (attn_gate, mlp_gate))

        if cfg.parallel_block:
            h_BTD = attn_norm(x_BTD)
            return attn_gate * run_attn(h_BTD), mlp_gate * mlp(h_BTD)

        mlp_norm = make_norm(cfg, "mlp_norm")
        if cfg.norm_placement == "pre":
            u_attn = attn_gate * run_attn(attn_norm(x_BTD))
            h_BTD = x_BTD + u_attn
            return u_attn, mlp_gate * mlp(mlp_norm(h_BTD))
        if cfg.norm_placement == "peri":
            u_attn = attn_gate * make_norm(cfg, "attn_out_norm")(run_attn(attn_norm(x_BTD)))
            h_BTD = x_BTD + u_attn
            return u_attn, mlp_gate * make_norm(cfg, "mlp_out_norm")(mlp(mlp_norm(h_BTD)))
        # post
        u_attn = attn_gate * (attn_norm(x_BTD + run_attn(x_BTD)) - x_BTD)
        h_BTD = x_BTD + u_attn
        return u_attn, mlp_gate * (mlp_norm(h_BTD + mlp(h_BTD)) - h_BTD)
