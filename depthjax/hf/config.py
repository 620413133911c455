"""Hugging Face config.json <-> ModelConfig.

`from_hf` reads every key of a config dictionary: keys it maps become ModelConfig fields,
keys that cannot change the forward pass (ids, dropout, labels, bookkeeping) are skipped,
and anything else -- an option depthjax does not implement, or a key it does not know --
raises HFError naming the key. `to_hf` is the inverse and refuses configs the target
architecture cannot express.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.config import ModelConfig
from .decoder_config import (
    ARCHITECTURES as DECODER_ARCHITECTURES,
    DECODER_TYPES,
    DEFAULTS as DECODER_DEFAULTS,
    default_decoder_type,
    from_hf_decoder,
    to_hf_decoder,
)
from .reader import HFError, Reader, expect

LLAMA_TYPES = DECODER_TYPES
MODEL_TYPES = DECODER_TYPES + ("gpt2", "bert")

ARCHITECTURES = {**DECODER_ARCHITECTURES, "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}

# transformers' own defaults for keys a hand-written config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    **DECODER_DEFAULTS,
    "gpt2": dict(
        n_positions=1024,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    "bert": dict(
        max_position_embeddings=512,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        tie_word_embeddings=True,
    ),
}

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _gpt2(r: Reader) -> dict:
    act = r.require(
        "activation_function", tuple(_ACTIVATIONS), "the MLP supports gelu and gelu_new (tanh)"
    )
    r.require("scale_attn_weights", (True, None), "attention is always scaled by 1/sqrt(d)")
    r.require(
        "scale_attn_by_inverse_layer_idx",
        (False, None),
        "per-layer attention scaling is not implemented",
    )
    r.require("add_cross_attention", (False, None), "cross-attention is not implemented")
    d = r.get("n_embd")
    return dict(
        family="gpt2",
        vocab_size=r.get("vocab_size"),
        d_model=d,
        n_layers=r.get("n_layer"),
        n_heads=r.get("n_head"),
        d_ff=r.get("n_inner") or 4 * d,
        max_seq_len=r.get("n_positions"),
        norm_eps=float(r.get("layer_norm_epsilon")),
        mlp=_ACTIVATIONS[act],
        tie_embeddings=bool(r.get("tie_word_embeddings")),
    )


def _bert(r: Reader) -> dict:
    act = r.require("hidden_act", tuple(_ACTIVATIONS), "the MLP supports gelu and gelu_new")
    r.require(
        "position_embedding_type",
        ("absolute", None),
        "only absolute position embeddings are implemented",
    )
    r.require("is_decoder", (False, None), "BERT is read as a bidirectional encoder")
    r.require("add_cross_attention", (False, None), "cross-attention is not implemented")
    r.get("tie_word_embeddings")  # only ties a masked-LM head, which BertModel lacks
    return dict(
        family="bert",
        vocab_size=r.get("vocab_size"),
        d_model=r.get("hidden_size"),
        n_layers=r.get("num_hidden_layers"),
        n_heads=r.get("num_attention_heads"),
        d_ff=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        type_vocab_size=r.get("type_vocab_size"),
        norm_eps=float(r.get("layer_norm_eps")),
        mlp=_ACTIVATIONS[act],
    )


def from_hf(d: Mapping[str, Any], *, ignore_keys=()) -> tuple[ModelConfig, str]:
    """(ModelConfig, model_type) from a config.json dictionary.

    `ignore_keys` names keys the caller knowingly wants skipped (they raise otherwise).
    """
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={d.get('architectures')}); supported: {MODEL_TYPES}"
        )
    r = Reader(d, _DEFAULTS[model_type])
    fields = (
        _gpt2(r)
        if model_type == "gpt2"
        else _bert(r)
        if model_type == "bert"
        else from_hf_decoder(r, model_type)
    )
    unknown = [k for k in r.leftover() if k not in ignore_keys]
    if "auto_map" in unknown:
        raise HFError(
            f"config.json has auto_map={d['auto_map']!r}: the model comes with its own "
            "modelling code, which depthjax never runs, so it may not be the "
            f"{model_type} architecture its model_type says; pass ignore_keys=('auto_map',) "
            "(depthjax convert --ignore-key auto_map) only if you know the code is "
            f"{model_type}'s own"
        )
    if unknown:
        raise HFError(
            f"config.json has keys depthjax does not implement for {model_type}: "
            f"{unknown}; pass ignore_keys={tuple(unknown)!r} only if you know they "
            "do not change the model"
        )
    return ModelConfig(**fields), model_type


def default_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a config exports to when none is named."""
    return cfg.family if cfg.family != "llama" else default_decoder_type(cfg)


def to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dictionary of `cfg` as the Hugging Face `model_type`."""
    model_type = model_type or default_model_type(cfg)
    if model_type not in MODEL_TYPES:
        raise HFError(f"unsupported export model_type={model_type!r}; choose from {MODEL_TYPES}")
    expect(
        cfg,
        model_type,
        parallel_block=False,
        family="bert" if model_type == "bert" else "gpt2" if model_type == "gpt2" else "llama",
    )
    head = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "dtype": "float32",
    }
    if model_type in ("gpt2", "bert"):
        expect(
            cfg,
            model_type,
            embed_scale=None,
            attn_softcap=None,
            final_softcap=None,
            query_scale_dim=None,
            layer_types=None,
        )
        if cfg.mlp in ("swiglu", "geglu"):
            raise HFError(
                f"cannot export to {model_type}: it needs a GELU MLP, the model has {cfg.mlp}"
            )
    if model_type == "gpt2":
        expect(
            cfg,
            model_type,
            norm="layer",
            norm_placement="pre",
            position="learned",
            bias=True,
            qkv_bias=True,
            qk_norm=None,
            causal=True,
            type_vocab_size=0,
            embed_norm=False,
            final_norm=True,
            head_dim=cfg.d_model // cfg.n_heads,
            n_kv_heads=cfg.n_heads,
        )
        return {
            **head,
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False,
        }
    if model_type == "bert":
        expect(
            cfg,
            model_type,
            norm="layer",
            norm_placement="post",
            position="learned",
            bias=True,
            qkv_bias=True,
            qk_norm=None,
            causal=False,
            embed_norm=True,
            final_norm=False,
            head_dim=cfg.d_model // cfg.n_heads,
            n_kv_heads=cfg.n_heads,
        )
        if cfg.type_vocab_size < 1:
            raise HFError("cannot export to bert: it needs token types")
        return {
            **head,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff,
            "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new",
            "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "add_cross_attention": False,
            "pad_token_id": 0,
        }
    return to_hf_decoder(cfg, model_type, head)
