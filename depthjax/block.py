"""Block: one transformer layer, written as two gated residual *updates*.

Every norm placement is expressed as `x_next = x + attn_gate * u_attn` followed by
`out = x_next + mlp_gate * u_mlp`, so a gate of 0 removes a sublayer exactly (for
post-norm too: its norm goes with it) and the traced updates add up to the residual.

* pre:  u = f(norm(x))
* peri: u = out_norm(f(norm(x)))            (normalize sublayer input and output, Gemma)
* out:  u = out_norm(f(x))                   (normalize sublayer output only, OLMo 2)
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
                 kv_mask_BT=None, kv_cache=None, attn_enabled: bool = True, window=None,
                 rope_table=None):
        """Returns the gated updates (u_attn_BTD, u_mlp_BTD); the block output is x + both.

        With `kv_cache` (see `Attention`) returns (u_attn_BTD, u_mlp_BTD, kv_cache).
        attn_enabled=False (static) skips the attention sublayer: exactly gate 0, without
        its compute (decoding steps that have no cache slot). window / rope_table: this
        row's attention kind (see depthjax.kinds and `Attention`).
        """
        cfg = self.cfg
        attn = Attention(cfg, name="attn")
        mlp = MLP(cfg, name="mlp")
        attn_norm = make_norm(cfg, "attn_norm")
        cache = [kv_cache]  # run_attn swaps in the updated cache

        def run_attn(h_BTD):
            out = attn(h_BTD, positions_BT, segment_ids_BT=segment_ids_BT,
                       kv_mask_BT=kv_mask_BT, kv_cache=cache[0], window=window,
                       rope_table=rope_table)
            if kv_cache is None:
                return out
            y_BTD, cache[0] = out
            return y_BTD

        x_BTD = x_BTD.astype(cfg.dtype)
        attn_gate, mlp_gate = (jnp.asarray(g, cfg.dtype) for g in (attn_gate, mlp_gate))
        gated_attn = lambda update: (attn_gate * update() if attn_enabled
                                     else jnp.zeros_like(x_BTD))

        if cfg.parallel_block:
            h_BTD = attn_norm(x_BTD)
            u_attn, u_mlp = gated_attn(lambda: run_attn(h_BTD)), mlp_gate * mlp(h_BTD)
        else:
            mlp_norm = make_norm(cfg, "mlp_norm")
            if cfg.norm_placement == "pre":
                u_attn = gated_attn(lambda: run_attn(attn_norm(x_BTD)))
                h_BTD = x_BTD + u_attn
                u_mlp = mlp_gate * mlp(mlp_norm(h_BTD))
            elif cfg.norm_placement == "peri":
                u_attn = gated_attn(lambda: make_norm(cfg, "attn_out_norm")(
                    run_attn(attn_norm(x_BTD))))
                h_BTD = x_BTD + u_attn
                u_mlp = mlp_gate * make_norm(cfg, "mlp_out_norm")(mlp(mlp_norm(h_BTD)))
            elif cfg.norm_placement == "out":
                u_attn = gated_attn(lambda: make_norm(cfg, "attn_out_norm")(run_attn(x_BTD)))
                h_BTD = x_BTD + u_attn
                u_mlp = mlp_gate * make_norm(cfg, "mlp_out_norm")(mlp(h_BTD))
            else:  # post
                u_attn = gated_attn(lambda: attn_norm(x_BTD + run_attn(x_BTD)) - x_BTD)
                h_BTD = x_BTD + u_attn
                u_mlp = mlp_gate * (mlp_norm(h_BTD + mlp(h_BTD)) - h_BTD)
        return (u_attn, u_mlp) if kv_cache is None else (u_attn, u_mlp, cache[0])
