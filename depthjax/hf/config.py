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

from ..config import ModelConfig


class HFError(ValueError):
    """A Hugging Face checkpoint or config that depthjax cannot read or write exactly."""


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MODEL_TYPES = LLAMA_TYPES + ("gpt2", "bert")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
}

# transformers' own defaults for keys a hand-written config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        max_position_embeddings=2048,
    ),
    "mistral": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=131072,
        sliding_window=4096,
    ),
    "qwen2": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=32768,
        use_sliding_window=False,
    ),
    "qwen3": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
        max_position_embeddings=32768,
        use_sliding_window=False,
    ),
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

# Keys that do not change the inference forward pass: token ids, dropout, init, caching,
# labels, task heads' extras and bookkeeping.
_INERT = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "model_type",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "classifier_dropout",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "pretraining_tp",
    "tokenizer_class",
    "task_specific_params",
    "gradient_checkpointing",
    "max_window_layers",
    # Numerics only: upcasting inside attention changes nothing in float32.
    "reorder_and_upcast_attn",
}

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class _Reader:
    """Reads a config dict, remembering which keys were consumed."""

    def __init__(self, d: Mapping[str, Any], model_type: str):
        self.d, self.used = dict(d), set()
        self.defaults = _DEFAULTS[model_type]

    def get(self, key, default=...):
        self.used.add(key)
        if key in self.d:
            return self.d[key]
        if key in self.defaults:
            return self.defaults[key]
        if default is ...:
            raise HFError(f"config.json is missing the required key {key!r}")
        return default

    def require(self, key, allowed, why: str):
        value = self.get(key, None)
        if value not in allowed:
            raise HFError(f"unsupported config option {key}={value!r}: {why}")
        return value

    def leftover(self) -> list[str]:
        return sorted(k for k in self.d if k not in self.used and k not in _INERT)


def _rope_theta(r: _Reader) -> float:
    """rope_theta from transformers >= 5 `rope_parameters` or the older top-level keys."""
    params, scaling = r.get("rope_parameters", None), r.get("rope_scaling", None)
    theta = r.get("rope_theta", None)
    if params is not None:
        rope_type = params.get("rope_type", params.get("type", "default"))
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if rope_type != "default" or extra:
            raise HFError(
                f"unsupported config option rope_parameters={params!r}: only plain "
                "RoPE (rope_type='default') is implemented, no rope scaling"
            )
        if theta is not None and "rope_theta" in params and params["rope_theta"] != theta:
            raise HFError(
                f"config.json disagrees with itself: rope_theta={theta} but "
                f"rope_parameters.rope_theta={params['rope_theta']}"
            )
        theta = params.get("rope_theta", theta)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
        raise HFError(
            f"unsupported config option rope_scaling={scaling!r}: rope scaling is not implemented"
        )
    return float(10000.0 if theta is None else theta)


def _llama(r: _Reader, model_type: str) -> dict:
    r.require("hidden_act", ("silu",), "the llama family uses SwiGLU with SiLU")
    if model_type == "mistral":
        r.require("sliding_window", (None,), "sliding-window attention is not implemented")
    if model_type in ("qwen2", "qwen3"):
        if r.get("use_sliding_window"):
            raise HFError(
                "unsupported config option use_sliding_window=True: sliding-window "
                "attention is not implemented"
            )
        r.get("sliding_window", None)  # only read by transformers when use_sliding_window
    layer_types = r.get("layer_types", None)
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise HFError(
            f"unsupported config option layer_types={sorted(set(layer_types))}: "
            "only full attention is implemented"
        )
    d, h = r.get("hidden_size"), r.get("num_attention_heads")
    if model_type == "qwen2":  # q, k, v carry biases; o and the MLP do not
        qkv_bias, bias = True, False
    elif model_type == "mistral":
        qkv_bias = bias = False
    else:
        attn_bias = bool(r.get("attention_bias"))
        mlp_bias = bool(r.get("mlp_bias")) if model_type == "llama" else attn_bias
        if attn_bias != mlp_bias:
            raise HFError(
                f"unsupported config option mlp_bias={mlp_bias} with "
                f"attention_bias={attn_bias}: depthjax has one `bias` flag for the "
                "attention output and the MLP"
            )
        qkv_bias = bias = attn_bias
    return dict(
        family="llama",
        vocab_size=r.get("vocab_size"),
        d_model=d,
        n_layers=r.get("num_hidden_layers"),
        n_heads=h,
        n_kv_heads=r.get("num_key_value_heads", None) or h,
        head_dim=r.get("head_dim", None) or d // h,
        d_ff=r.get("intermediate_size"),
        max_seq_len=r.get("max_position_embeddings"),
        norm_eps=float(r.get("rms_norm_eps")),
        rope_theta=_rope_theta(r),
        qkv_bias=qkv_bias,
        bias=bias,
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(r.get("tie_word_embeddings")),
    )


def _gpt2(r: _Reader) -> dict:
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


def _bert(r: _Reader) -> dict:
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
    r = _Reader(d, model_type)
    fields = (
        _gpt2(r)
        if model_type == "gpt2"
        else _bert(r)
        if model_type == "bert"
        else _llama(r, model_type)
    )
    unknown = [k for k in r.leftover() if k not in ignore_keys]
    if unknown:
        raise HFError(
            f"config.json has keys depthjax does not implement for {model_type}: "
            f"{unknown}; pass ignore_keys={tuple(unknown)!r} only if you know they "
            "do not change the model"
        )
    return ModelConfig(**fields), model_type


def default_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a config exports to when none is named."""
    if cfg.family != "llama":
        return cfg.family
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"


def _expect(cfg: ModelConfig, model_type: str, **wanted) -> None:
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise HFError(
                f"cannot export to {model_type}: it needs {key}={value!r}, the "
                f"model has {key}={getattr(cfg, key)!r}"
            )


def to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json dictionary of `cfg` as the Hugging Face `model_type`."""
    model_type = model_type or default_model_type(cfg)
    if model_type not in MODEL_TYPES:
        raise HFError(f"unsupported export model_type={model_type!r}; choose from {MODEL_TYPES}")
    _expect(
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
    if model_type == "gpt2":
        _expect(
            cfg,
            model_type,
            norm="layer",
            norm_placement="pre",
            position="learned",
            bias=True,
            qkv_bias=True,
            qk_norm=False,
            causal=True,
            type_vocab_size=0,
            embed_norm=False,
            final_norm=True,
            head_dim=cfg.d_model // cfg.n_heads,
            n_kv_heads=cfg.n_heads,
        )
        if cfg.mlp == "swiglu":
            raise HFError("cannot export to gpt2: it needs a GELU MLP, the model has swiglu")
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
        _expect(
            cfg,
            model_type,
            norm="layer",
            norm_placement="post",
            position="learned",
            bias=True,
            qkv_bias=True,
            qk_norm=False,
            causal=False,
            embed_norm=True,
            final_norm=False,
            head_dim=cfg.d_model // cfg.n_heads,
            n_kv_heads=cfg.n_heads,
        )
        if cfg.mlp == "swiglu" or cfg.type_vocab_size < 1:
            raise HFError("cannot export to bert: it needs a GELU MLP and token types")
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
    _expect(
        cfg,
        model_type,
        norm="rms",
        norm_placement="pre",
        position="rope",
        mlp="swiglu",
        causal=True,
        type_vocab_size=0,
        embed_norm=False,
        final_norm=True,
        qk_norm=model_type == "qwen3",
    )
    if model_type == "qwen2":
        _expect(cfg, model_type, qkv_bias=True, bias=False)
    elif model_type == "mistral":
        _expect(cfg, model_type, qkv_bias=False, bias=False)
    else:
        _expect(cfg, model_type, qkv_bias=cfg.bias)
    out = {
        **head,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = cfg.bias
    if model_type == "llama":
        out["mlp_bias"] = cfg.bias
    if model_type == "mistral":
        out["sliding_window"] = None
    if model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out
