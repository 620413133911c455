"""What llama.cpp can run: the config checks and the per-layer layout of a GGUF export.

A GGUF layer is one exported step. A program whose kept steps all run both sublayers is
llama.cpp's `llama` architecture. Otherwise it is `deci` (the graph llama.cpp wrote for
NVIDIA's Nemotron-51B), whose per-layer arrays `deci.attention.head_count`,
`deci.attention.head_count_kv` and `deci.feed_forward_length` say which sublayers a
layer computes; llama.cpp skips the attention of a layer whose head count is 0 and the
feed-forward of a layer whose length is 0. Two corners of that graph need care (read in
llama.cpp's src/models/deci.cpp and llama-model.cpp, as vendored by llama-cpp-python
0.3.36):

* a layer with attention and feed_forward_length 0 loses its attention output (the
  graph's `continue` skips the residual add), so an attention-only step keeps a 1-wide
  feed-forward with zero weights (`ZERO_FF`): it adds exactly 0 for a negligible cost;
* the head size is derived from layer 0's head count, so when step 0's attention is off
  layer 0 gets `head_count = n_heads, head_count_kv = 0`, the graph's "linear attention"
  (output projection of the normalized input), with a zero projection: it adds exactly 0
  and needs no KV cache.

Steps with both sublayers off are left out. Everything else the llama graph cannot
compute is refused by name (`check`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..core.config import ModelConfig
from ..errors import DepthjaxError

ZERO_FF = 1  # feed_forward_length of an attention-only deci layer (zero weights)
ROPE_SCALINGS = ("linear", "llama3")  # what the export writes (metadata / rope_freqs)


class GGUFError(DepthjaxError):
    """A model, program, tokenizer or setting that a GGUF file for llama.cpp cannot hold."""


def check(cfg: ModelConfig) -> None:
    """Raise GGUFError naming the first thing of `cfg` llama.cpp's llama graph lacks."""
    if cfg.family != "llama":
        raise GGUFError(
            f"family {cfg.family!r}: only Llama-family decoders (llama, mistral, qwen2) "
            "export to GGUF here"
        )
    unsupported = [
        (cfg.norm_placement != "pre", f"norm_placement={cfg.norm_placement!r} (Gemma/OLMo 2)"),
        (cfg.norm != "rms", f"norm={cfg.norm!r}"),
        (cfg.mlp != "swiglu", f"mlp={cfg.mlp!r}"),
        (cfg.position != "rope", f"position={cfg.position!r}"),
        (not cfg.causal, "a bidirectional (causal=False) model"),
        (cfg.parallel_block, "parallel_block (GPT-J blocks)"),
        (cfg.qk_norm is not None, f"qk_norm={cfg.qk_norm!r} (Qwen3/OLMo 2 q/k norms)"),
        (cfg.attn_softcap is not None, "attention soft-capping (attn_softcap)"),
        (cfg.final_softcap is not None, "logit soft-capping (final_softcap)"),
        (cfg.embed_scale is not None, "scaled embeddings (embed_scale)"),
        (cfg.query_scale_dim is not None, "a query scale other than head_dim (query_scale_dim)"),
        (bool(cfg.local_rows), f"sliding-window rows {list(cfg.local_rows)} (layer_types 'L')"),
        (
            cfg.rope_fraction != 1.0,
            f"partial rotary embeddings (rope_fraction={cfg.rope_fraction})",
        ),
        (cfg.embed_norm, "a norm after the embeddings (embed_norm)"),
        (not cfg.final_norm, "no final norm (final_norm=False)"),
        (cfg.type_vocab_size > 0, "token type embeddings"),
        (
            cfg.rope_scaling is not None and cfg.rope_scaling.type not in ROPE_SCALINGS,
            f"RoPE scaling {getattr(cfg.rope_scaling, 'type', None)!r} (exported: "
            f"{', '.join(ROPE_SCALINGS)})",
        ),
    ]
    for bad, what in unsupported:
        if bad:
            raise GGUFError(f"llama.cpp's llama/deci graph cannot express {what}")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One GGUF layer: the exported `step`, its attention ("full", "none", or "zero": the
    zero linear attention of layer 0) and its feed_forward_length (d_ff, ZERO_FF or 0)."""

    step: int
    attn: str
    ff: int

    def head_counts(self, cfg: ModelConfig) -> tuple[int, int]:
        return {
            "full": (cfg.n_heads, cfg.n_kv_heads),
            "zero": (cfg.n_heads, 0),
            "none": (0, 0),
        }[self.attn]


def layers(program, cfg: ModelConfig, keep=()) -> tuple[str, list[Layer]]:
    """(architecture, layers) of a concrete program: "llama" when every kept step runs
    both sublayers, else "deci" with the module docstring's rules. `keep`: steps kept
    even with both sublayers off, as a zero feed-forward (their MLP bias holds a folded
    recovery adapter's bias)."""
    attn_on = np.asarray(program.attn) != 0
    mlp_on = np.asarray(program.mlp) != 0
    out = []
    for step in range(len(attn_on)):
        if not (attn_on[step] or mlp_on[step] or step in keep):
            continue
        attn = "full" if attn_on[step] else "none"
        ff = cfg.d_ff if mlp_on[step] else ZERO_FF
        out.append(Layer(step, attn, ff))
    if all(layer.attn == "full" and layer.ff == cfg.d_ff for layer in out):
        return "llama", out
    if out and out[0].attn == "none" and any(layer.attn == "full" for layer in out):
        out[0] = dataclasses.replace(out[0], attn="zero")
    return "deci", out
