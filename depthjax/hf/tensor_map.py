"""Which Hugging Face tensor holds which depthjax parameter, and how to convert it.

A `TensorRule` ties one HF tensor to one or more of our leaves (GPT-2's fused `c_attn`
feeds q, k and v). Names are templates: `{p}` is the body prefix ("model.", "transformer.",
"bert." or ""), `{i}` the layer index of a block tensor. Converters work on one layer
(block leaves without their leading table axis) and use only `.T`, `.reshape`, slicing and
`_concat`, so they run on numpy arrays and on `jax.eval_shape` structs alike (the loader
derives each HF tensor's expected shape from our parameter shapes that way).

HF linear weights are [out, in]; our kernels are [in, ...out]: q [D,H,Dh], k/v [D,K,Dh],
o [H,Dh,D], gate/up [D,F], down [F,D]. GPT-2's Conv1D weights are already [in, out].

Decoder families differ in names and packing only: Gemma stores RMSNorm weights w of a
(1 + w) norm (we keep the scale 1 + w), OLMo 2 normalizes whole q/k projections, Phi-3
fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from ..core.config import ModelConfig

Path = tuple[str, ...]

# Per model type: body prefixes seen in the wild, the canonical one (written on export)
# first, and the tensor whose presence identifies the prefix.
PREFIXES = {"llama": ("model.", ""), "gpt2": ("transformer.", ""), "bert": ("", "bert.")}
PROBE = {
    "llama": "{p}embed_tokens.weight",
    "gpt2": "{p}wte.weight",
    "bert": "{p}embeddings.word_embeddings.weight",
}
# Buffers that some checkpoints store although they are not parameters: recomputed here.
BUFFERS = {
    "llama": ("{p}layers.{i}.self_attn.rotary_emb.inv_freq",),
    "gpt2": ("{p}h.{i}.attn.bias", "{p}h.{i}.attn.masked_bias"),
    "bert": ("{p}embeddings.position_ids", "{p}embeddings.token_type_ids"),
}
# Parameters of the HF model that depthjax's model does not have (skipped with a warning).
NOT_MODELLED = {"bert": ("{p}pooler.dense.weight", "{p}pooler.dense.bias")}


def leaf_at(tree: dict, path: Path):
    """The leaf of a nested params dict at `path`."""
    for key in path:
        tree = tree[key]
    return tree


def _concat(xs, axis):
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.concatenate(xs, axis)
    return jnp.concatenate(xs, axis)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    name: str  # HF name template
    leaves: tuple[Path, ...]  # our parameter paths, e.g. ("blocks", "attn", "q", "kernel")
    to_ours: Callable  # hf array -> tuple of leaf arrays
    to_hf: Callable  # leaf arrays -> hf array

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name

    def hf_name(self, prefix: str, layer: int | None = None) -> str:
        return self.name.format(p=prefix, i=layer)


def _same(name, leaf):
    return TensorRule(name, (leaf,), lambda w: (w,), lambda x: x)


def _transposed(name, leaf):
    return TensorRule(name, (leaf,), lambda w: (w.T,), lambda x: x.T)


def _heads_in(name, leaf, heads, head_dim):
    """Linear [heads*head_dim, D] <-> kernel [D, heads, head_dim]."""
    return TensorRule(
        name,
        (leaf,),
        lambda w: (w.T.reshape(w.shape[1], heads, head_dim),),
        lambda k: k.reshape(k.shape[0], heads * head_dim).T,
    )


def _heads_bias(name, leaf, heads, head_dim):
    return TensorRule(
        name,
        (leaf,),
        lambda b: (b.reshape(heads, head_dim),),
        lambda b: b.reshape(heads * head_dim),
    )


def _heads_out(name, leaf, heads, head_dim, *, conv1d=False):
    """Linear [D, H*Dh] (Conv1D: [H*Dh, D]) <-> kernel [H, Dh, D]."""
    if conv1d:
        return TensorRule(
            name,
            (leaf,),
            lambda w: (w.reshape(heads, head_dim, w.shape[1]),),
            lambda k: k.reshape(heads * head_dim, k.shape[-1]),
        )
    return TensorRule(
        name,
        (leaf,),
        lambda w: (w.T.reshape(heads, head_dim, w.shape[0]),),
        lambda k: k.reshape(heads * head_dim, k.shape[-1]).T,
    )


def _fused_qkv(name, leaves, heads, head_dim, *, bias: bool):
    """GPT-2 c_attn: Conv1D weight [D, 3*H*Dh] (or bias [3*H*Dh]) <-> q, k, v."""
    width = heads * head_dim
    if bias:
        split = lambda b: tuple(
            b[j * width : (j + 1) * width].reshape(heads, head_dim) for j in range(3)
        )
        return TensorRule(
            name, leaves, split, lambda *bs: _concat([b.reshape(width) for b in bs], 0)
        )
    split = lambda w: tuple(
        w[:, j * width : (j + 1) * width].reshape(w.shape[0], heads, head_dim) for j in range(3)
    )
    return TensorRule(
        name, leaves, split, lambda *ks: _concat([k.reshape(k.shape[0], width) for k in ks], 1)
    )


def _blocks(*path):
    return ("blocks",) + path


def _norm(name, path, *, bias: bool):
    rules = [_same(f"{name}.weight", path + ("scale",))]
    return rules + ([_same(f"{name}.bias", path + ("bias",))] if bias else [])


def _offset_norm(name, path):
    """Gemma's RMSNorm computes x * (1 + w): HF stores w, we keep the scale 1 + w."""
    return TensorRule(
        f"{name}.weight", (path + ("scale",),), lambda w: (w + 1.0,), lambda s: s - 1.0
    )


def _reshaped(name, leaf, shape):
    """A flat HF vector [prod(shape)] <-> our leaf of `shape` (OLMo 2's q/k norms)."""
    return TensorRule(name, (leaf,), lambda w: (w.reshape(shape),), lambda x: x.reshape(-1))


def _fused_rows(name, leaves, splits, to_leaf, from_leaf):
    """One HF linear weight [sum(splits), D] whose row blocks are several of our kernels."""
    bounds = np.cumsum([0, *splits])
    return TensorRule(
        name,
        leaves,
        lambda w: tuple(to_leaf(j, w[bounds[j] : bounds[j + 1]]) for j in range(len(splits))),
        lambda *ks: _concat([from_leaf(j, k) for j, k in enumerate(ks)], 0),
    )


# Per-layer norms of each decoder placement: HF module name -> our norm.
_LAYER_NORMS = {
    "pre": (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")),
    "peri": (
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "attn_out_norm"),
        ("pre_feedforward_layernorm", "mlp_norm"),
        ("post_feedforward_layernorm", "mlp_out_norm"),
    ),
    "out": (
        ("post_attention_layernorm", "attn_out_norm"),
        ("post_feedforward_layernorm", "mlp_out_norm"),
    ),
}
OFFSET_NORM_TYPES = ("gemma2", "gemma3_text")  # (1 + w) RMSNorm


def _decoder_rules(cfg: ModelConfig, model_type: str) -> list[TensorRule]:
    """Llama and the decoder families built like it (Mistral, Qwen, Gemma, OLMo 2, Phi-3)."""
    H, K, Dh, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    L = "{p}layers.{i}."
    norm = (
        (lambda name, path: _offset_norm(name, path))
        if model_type in OFFSET_NORM_TYPES
        else (lambda name, path: _norm(name, path, bias=False)[0])
    )
    rules = [_same("{p}embed_tokens.weight", ("embed", "tok", "embedding"))]
    rules += [norm(L + hf, _blocks(ours)) for hf, ours in _LAYER_NORMS[cfg.norm_placement]]
    attn = lambda *path: _blocks("attn", *path)
    if model_type == "phi3":
        rules.append(
            _fused_rows(
                f"{L}self_attn.qkv_proj.weight",
                tuple(attn(p, "kernel") for p in "qkv"),
                (H * Dh, K * Dh, K * Dh),
                lambda j, w: w.T.reshape(w.shape[1], (H, K, K)[j], Dh),
                lambda j, k: k.reshape(k.shape[0], -1).T,
            )
        )
    else:
        for proj, heads in (("q", H), ("k", K), ("v", K)):
            rules.append(
                _heads_in(f"{L}self_attn.{proj}_proj.weight", attn(proj, "kernel"), heads, Dh)
            )
    if cfg.qkv_bias:
        rules += [
            _heads_bias(f"{L}self_attn.{proj}_proj.bias", attn(proj, "bias"), heads, Dh)
            for proj, heads in (("q", H), ("k", K), ("v", K))
        ]
    rules.append(_heads_out(f"{L}self_attn.o_proj.weight", attn("o", "kernel"), H, Dh))
    if cfg.bias:
        rules.append(_same(f"{L}self_attn.o_proj.bias", attn("o", "bias")))
    if cfg.qk_norm == "head":
        rules += [norm(f"{L}self_attn.{n}", attn(n)) for n in ("q_norm", "k_norm")]
    elif cfg.qk_norm == "full":
        rules += [
            _reshaped(f"{L}self_attn.{n}.weight", attn(n, "scale"), (heads, Dh))
            for n, heads in (("q_norm", H), ("k_norm", K))
        ]
    mlp = lambda *path: _blocks("mlp", *path)
    if model_type == "phi3":
        rules.append(
            _fused_rows(
                f"{L}mlp.gate_up_proj.weight",
                (mlp("gate", "kernel"), mlp("up", "kernel")),
                (F, F),
                lambda j, w: w.T,
                lambda j, k: k.T,
            )
        )
        rules.append(_transposed(f"{L}mlp.down_proj.weight", mlp("down", "kernel")))
    else:
        rules += [
            _transposed(f"{L}mlp.{proj}_proj.weight", mlp(proj, "kernel"))
            for proj in ("gate", "up", "down")
        ]
    if cfg.bias:
        rules += [
            _same(f"{L}mlp.{proj}_proj.bias", mlp(proj, "bias")) for proj in ("gate", "up", "down")
        ]
    rules.append(norm("{p}norm", ("head", "norm")))
    return rules


def _gpt2_rules(cfg: ModelConfig) -> list[TensorRule]:
    H, Dh = cfg.n_heads, cfg.head_dim
    L = "{p}h.{i}."
    qkv = lambda kind: tuple(_blocks("attn", n, kind) for n in ("q", "k", "v"))
    return [
        _same("{p}wte.weight", ("embed", "tok", "embedding")),
        _same("{p}wpe.weight", ("embed", "pos", "embedding")),
        *_norm(L + "ln_1", _blocks("attn_norm"), bias=True),
        _fused_qkv(L + "attn.c_attn.weight", qkv("kernel"), H, Dh, bias=False),
        _fused_qkv(L + "attn.c_attn.bias", qkv("bias"), H, Dh, bias=True),
        _heads_out(L + "attn.c_proj.weight", _blocks("attn", "o", "kernel"), H, Dh, conv1d=True),
        _same(L + "attn.c_proj.bias", _blocks("attn", "o", "bias")),
        *_norm(L + "ln_2", _blocks("mlp_norm"), bias=True),
        _same(L + "mlp.c_fc.weight", _blocks("mlp", "up", "kernel")),
        _same(L + "mlp.c_fc.bias", _blocks("mlp", "up", "bias")),
        _same(L + "mlp.c_proj.weight", _blocks("mlp", "down", "kernel")),
        _same(L + "mlp.c_proj.bias", _blocks("mlp", "down", "bias")),
        *_norm("{p}ln_f", ("head", "norm"), bias=True),
    ]


def _bert_rules(cfg: ModelConfig) -> list[TensorRule]:
    H, Dh = cfg.n_heads, cfg.head_dim
    L = "{p}encoder.layer.{i}."
    E = "{p}embeddings."
    rules = [
        _same(E + "word_embeddings.weight", ("embed", "tok", "embedding")),
        _same(E + "position_embeddings.weight", ("embed", "pos", "embedding")),
        _same(E + "token_type_embeddings.weight", ("embed", "type", "embedding")),
        *_norm(E + "LayerNorm", ("embed", "norm"), bias=True),
    ]
    for hf, ours in (("query", "q"), ("key", "k"), ("value", "v")):
        name = f"{L}attention.self.{hf}"
        rules += [
            _heads_in(name + ".weight", _blocks("attn", ours, "kernel"), H, Dh),
            _heads_bias(name + ".bias", _blocks("attn", ours, "bias"), H, Dh),
        ]
    return rules + [
        _heads_out(L + "attention.output.dense.weight", _blocks("attn", "o", "kernel"), H, Dh),
        _same(L + "attention.output.dense.bias", _blocks("attn", "o", "bias")),
        *_norm(L + "attention.output.LayerNorm", _blocks("attn_norm"), bias=True),
        _transposed(L + "intermediate.dense.weight", _blocks("mlp", "up", "kernel")),
        _same(L + "intermediate.dense.bias", _blocks("mlp", "up", "bias")),
        _transposed(L + "output.dense.weight", _blocks("mlp", "down", "kernel")),
        _same(L + "output.dense.bias", _blocks("mlp", "down", "bias")),
        *_norm(L + "output.LayerNorm", _blocks("mlp_norm"), bias=True),
    ]


def hf_family(model_type: str) -> str:
    """The naming family: "gpt2", "bert", or "llama" for every decoder built like it."""
    return model_type if model_type in ("gpt2", "bert") else "llama"


LM_HEAD = _transposed("lm_head.weight", ("head", "out", "kernel"))


def rules_for(cfg: ModelConfig, model_type: str) -> list[TensorRule]:
    """Every tensor of the HF checkpoint of `cfg` (lm_head only when embeddings are untied)."""
    family = hf_family(model_type)
    if family == "llama":
        rules = _decoder_rules(cfg, model_type)
    else:
        rules = {"gpt2": _gpt2_rules, "bert": _bert_rules}[family](cfg)
    if family != "bert" and not cfg.tie_embeddings:
        rules.append(LM_HEAD)
    return rules
