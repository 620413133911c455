"""config.json <-> ModelConfig for the decoder families built like Llama: Llama 2/3.x,
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), OLMo 2 and Phi-3.

They differ in options only (see depthjax.core.config): norm placement, activation, biases,
q/k norms, Gemma's scalings and soft-caps, RoPE variants, and which layers attend through
a sliding window (`layer_types`). Both config generations are read: transformers >= 5
(`rope_parameters`, possibly nested per layer type) and the older top-level keys
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `partial_rotary_factor`); both are
written, consistently, so either generation reloads an export.
"""

from __future__ import annotations

import math
from typing import Any

from ..core.config import ModelConfig
from ..core.rope import RopeError, RopeScaling
from .reader import HFError, Reader, expect

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3")
GEMMA_TYPES = ("gemma2", "gemma3_text")
GEMMA3_PATTERN = 6  # transformers' default: every 6th gemma3 layer is global

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

_QWEN = dict(
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
)
_GEMMA = dict(
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    hidden_activation="gelu_pytorch_tanh",
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    use_bidirectional_attention=False,
)
# transformers' own defaults for keys a hand-written config.json may leave out.
DEFAULTS: dict[str, dict[str, Any]] = {
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
    "qwen2": _QWEN,
    "qwen3": dict(_QWEN, attention_bias=False, head_dim=128),
    "gemma2": dict(
        _GEMMA,
        max_position_embeddings=8192,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        _GEMMA,
        max_position_embeddings=131072,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_theta=1e6,
        rope_local_base_freq=1e4,
    ),
    "olmo2": dict(
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        hidden_act="silu",
        max_position_embeddings=2048,
    ),
    "phi3": dict(
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        sliding_window=None,
    ),
}

# HF rope dict keys <-> RopeScaling fields.
_ROPE_KEYS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_seq_len",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "attention_factor": "attention_factor",
    "truncate": "truncate",
    "short_factor": "short_factor",
    "long_factor": "long_factor",
}
_ROPE_GENERIC = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
# transformers' default pad_token_id per type (an embedding row index: must fit the vocab)
_DEFAULT_PAD = {"phi3": 32000, "olmo2": 1, "gemma2": 0, "gemma3_text": 0}
_LAYER_TYPES = {"full_attention": "G", "sliding_attention": "L"}


# ------------------------------------------------------------------------------ RoPE
def _scaling(params: dict, model_type: str, max_pos: int, original) -> RopeScaling | None:
    """RopeScaling from one HF rope dict (None for plain RoPE)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # as transformers' Phi3Config
    unknown = sorted(set(params) - _ROPE_GENERIC - set(_ROPE_KEYS))
    if unknown:
        raise HFError(f"unsupported rope option(s) {unknown} in {params!r}")
    if rope_type == "default":
        extra = sorted(set(params) - _ROPE_GENERIC)
        if extra:
            raise HFError(f"plain RoPE (rope_type='default') with scaling keys {extra}")
        return None
    fields = {_ROPE_KEYS[k]: v for k, v in params.items() if k in _ROPE_KEYS}
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers: Phi-3's top-level key wins, others default to max_position_embeddings
        fields["original_max_seq_len"] = (
            original if original is not None else fields.get("original_max_seq_len", max_pos)
        )
    try:
        return RopeScaling(type=rope_type, **fields)
    except RopeError as e:
        raise HFError(f"unsupported config option rope_type={rope_type!r}: {e}") from None


def _rope(r: Reader, model_type: str, max_pos: int) -> dict:
    """rope_theta, rope_scaling, rope_fraction, local_rope_theta from either generation."""
    params, scaling = r.get("rope_parameters", None), r.get("rope_scaling", None)
    theta, fraction = r.get("rope_theta", None), r.get("partial_rotary_factor", None)
    gemma3 = model_type == "gemma3_text"
    local = r.get("rope_local_base_freq", None) if gemma3 else None
    original = r.get("original_max_position_embeddings", None) if model_type == "phi3" else None
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise HFError(
                f"config.json has {key}={value!r}: expected an object such as "
                '{"rope_type": "linear", "factor": 2.0} or null'
            )
    nested = isinstance(params, dict) and set(params) & set(_LAYER_TYPES)
    if nested and not gemma3:
        raise HFError(
            f"unsupported config option rope_parameters={params!r}: RoPE per layer "
            "type is implemented for gemma3 only"
        )
    if params is None:  # transformers < 5: the scaling dict plus top-level keys
        glob = dict(scaling or {})
        glob.setdefault("rope_theta", theta)
        loc = {"rope_theta": local}
    else:
        glob = dict(params["full_attention"] if nested else params)
        loc = dict(params.get("sliding_attention") or {}) if nested else {"rope_theta": local}
        if scaling is not None:  # both generations present: they must agree
            old, new = (
                _scaling(scaling, model_type, max_pos, original),
                _scaling(glob, model_type, max_pos, original),
            )
            if old != new:
                raise HFError(
                    f"config.json disagrees with itself: rope_scaling={scaling!r} "
                    f"but rope_parameters={params!r}"
                )
        for key, top, inner in (
            ("rope_theta", theta, glob.get("rope_theta")),
            ("rope_local_base_freq", local, loc.get("rope_theta")),
        ):
            if top is not None and inner is not None and float(top) != float(inner):
                raise HFError(
                    f"config.json disagrees with itself: {key}={top} but "
                    f"rope_parameters says {inner}"
                )
    defaults = r.defaults
    out = dict(
        rope_theta=float(glob.get("rope_theta") or theta or defaults.get("rope_theta", 1e4)),
        rope_scaling=_scaling(glob, model_type, max_pos, original),
        rope_fraction=float(glob.get("partial_rotary_factor", fraction or 1.0)),
    )
    if gemma3:
        if _scaling(loc, model_type, max_pos, None) is not None:
            raise HFError(f"unsupported rope option: scaled RoPE on sliding layers ({loc!r})")
        out["local_rope_theta"] = float(
            loc.get("rope_theta") or local or defaults["rope_local_base_freq"]
        )
    if out["rope_fraction"] != 1.0 and model_type != "phi3":
        raise HFError(
            f"unsupported config option partial_rotary_factor="
            f"{out['rope_fraction']} for {model_type} (partial rotary: phi3)"
        )
    if (
        model_type == "phi3"
        and out["rope_scaling"] is not None
        and out["rope_scaling"].type != "longrope"
    ):
        raise HFError(
            f"phi3 supports rope_type default or longrope, got {out['rope_scaling'].type!r}"
        )
    return out


def _rope_dict(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    out = {"rope_type": "default" if s is None else s.type, "rope_theta": cfg.rope_theta}
    if s is not None:
        back = {v: k for k, v in _ROPE_KEYS.items()}
        out.update({back[k]: v for k, v in s.to_dict().items() if k != "type"})
    if cfg.rope_fraction != 1.0:
        out["partial_rotary_factor"] = cfg.rope_fraction
    return out


def _write_rope(cfg: ModelConfig, model_type: str) -> dict:
    glob = _rope_dict(cfg)
    scaling = (
        None
        if cfg.rope_scaling is None
        else {k: v for k, v in glob.items() if k not in ("rope_theta", "partial_rotary_factor")}
    )
    out = {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": glob}
    if cfg.rope_fraction != 1.0:
        out["partial_rotary_factor"] = cfg.rope_fraction
    if model_type == "gemma3_text":
        local = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta
        out["rope_local_base_freq"] = local
        out["rope_parameters"] = {
            "full_attention": glob,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    elif cfg.local_rope_theta is not None and cfg.local_rows:
        raise HFError(
            f"cannot export to {model_type}: a separate RoPE base for local rows "
            f"(local_rope_theta={cfg.local_rope_theta}) is gemma3's"
        )
    if model_type == "phi3":
        s = cfg.rope_scaling
        out["original_max_position_embeddings"] = (
            s.original_max_seq_len if s is not None and s.original_max_seq_len else cfg.max_seq_len
        )
    return out


# --------------------------------------------------------------------- layer types
def _layer_types(r: Reader, model_type: str, n_layers: int) -> dict:
    """sliding_window and the per-row layer_types string ("G"/"L") of the checkpoint."""
    listed = r.get("layer_types", None)
    if model_type in ("llama", "olmo2"):
        window, default = None, ["full_attention"] * n_layers
    elif model_type in ("mistral", "phi3"):  # one window for every layer, if any
        window = r.get("sliding_window")
        default = ["sliding_attention" if window else "full_attention"] * n_layers
        if listed is not None and list(listed) != default:
            raise HFError(
                f"unsupported config option layer_types={listed}: {model_type} "
                f"applies sliding_window={window} to every layer"
            )
    elif model_type in ("qwen2", "qwen3"):
        use, window = r.get("use_sliding_window"), r.get("sliding_window")
        window = window if use else None  # transformers ignores the window unless used
        first = r.get("max_window_layers")
        default = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(n_layers)
        ]
    else:  # gemma
        if r.get("use_bidirectional_attention"):
            raise HFError(
                "unsupported config option use_bidirectional_attention=True: "
                "depthjax runs Gemma as a causal decoder"
            )
        window = r.get("sliding_window")
        # transformers >= 5 saves gemma3's pattern as "_sliding_window_pattern" too
        saved = r.get("_sliding_window_pattern", None)
        period = 2 if model_type == "gemma2" else r.get("sliding_window_pattern", None) or saved
        period = period or GEMMA3_PATTERN
        default = [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers)
        ]
    types = default if listed is None else list(listed)
    if len(types) != n_layers:
        raise HFError(f"layer_types has {len(types)} entries for {n_layers} layers")
    bad = sorted(set(types) - set(_LAYER_TYPES))
    if bad:
        raise HFError(
            f"unsupported config option layer_types={bad}: only full_attention and "
            "sliding_attention are implemented"
        )
    letters = "".join(_LAYER_TYPES[t] for t in types)
    if "L" in letters and window is None:
        raise HFError(
            "layer_types has sliding_attention layers but no sliding_window "
            f"(for {model_type}: set sliding_window / use_sliding_window)"
        )
    if "L" not in letters:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=letters)


def _write_layer_types(cfg: ModelConfig, model_type: str) -> dict:
    letters = cfg.layer_types or "G" * cfg.n_layers
    window = cfg.sliding_window if "L" in letters else None
    names = [{"G": "full_attention", "L": "sliding_attention"}[t] for t in letters]
    if model_type in ("llama", "olmo2"):
        if window is not None:
            raise HFError(
                f"cannot export to {model_type}: it has no sliding-window attention, "
                f"the model has local rows {list(cfg.local_rows)}"
            )
        return {}
    if model_type in ("mistral", "phi3"):
        if window is not None and "G" in letters:
            raise HFError(
                f"cannot export to {model_type}: it applies one sliding window to "
                f"every layer, the model mixes global and local rows ({letters}); "
                "export as qwen2 or gemma"
            )
        return {"sliding_window": window}
    if model_type in ("qwen2", "qwen3"):
        return {
            "use_sliding_window": window is not None,
            "sliding_window": window,
            "max_window_layers": len(letters) - len(letters.lstrip("G")),
            "layer_types": names,
        }
    out = {"sliding_window": window or DEFAULTS[model_type]["sliding_window"], "layer_types": names}
    return out


# --------------------------------------------------------------------- whole configs
def from_hf_decoder(r: Reader, model_type: str) -> dict:
    """ModelConfig fields of a decoder config.json."""
    gemma = model_type in GEMMA_TYPES
    if gemma:
        r.require(
            "hidden_activation",
            ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh"),
            "Gemma's GeGLU gates with the tanh-approximate GELU",
        )
        r.get("hidden_act", None)  # Gemma 2/3 checkpoints carry it; transformers ignores it
    else:
        r.require("hidden_act", ("silu",), f"{model_type} uses SwiGLU with SiLU")
    d, h = r.get("hidden_size"), r.get("num_attention_heads")
    if model_type == "qwen2":  # q, k, v carry biases; o and the MLP do not
        qkv_bias, bias = True, False
    elif model_type in ("mistral", "phi3"):
        qkv_bias = bias = False
        r.get("attention_bias", None)  # some Phi-3 configs carry it; transformers ignores it
    elif model_type == "llama":
        attn_bias, mlp_bias = bool(r.get("attention_bias")), bool(r.get("mlp_bias"))
        if attn_bias != mlp_bias:
            raise HFError(
                f"unsupported config option mlp_bias={mlp_bias} with "
                f"attention_bias={attn_bias}: depthjax has one `bias` flag for the "
                "attention output and the MLP"
            )
        qkv_bias = bias = attn_bias
    else:  # qwen3, gemma, olmo2: attention_bias covers q, k, v, o but not the MLP
        if r.get("attention_bias"):
            raise HFError(
                f"unsupported config option attention_bias=True for {model_type}: "
                "depthjax has one `bias` flag for the attention output and the MLP"
            )
        qkv_bias = bias = False
    n_layers = r.get("num_hidden_layers")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise HFError(f"num_hidden_layers must be a positive integer, got {n_layers!r}")
    max_pos = r.get("max_position_embeddings")
    fields = dict(
        family="llama",
        vocab_size=r.get("vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=h,
        n_kv_heads=r.get("num_key_value_heads", None) or h,
        head_dim=r.get("head_dim", None) or d // h,
        d_ff=r.get("intermediate_size"),
        max_seq_len=max_pos,
        norm_eps=float(r.get("rms_norm_eps")),
        qkv_bias=qkv_bias,
        bias=bias,
        tie_embeddings=bool(r.get("tie_word_embeddings")),
        qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(model_type),
        norm_placement="peri" if gemma else "out" if model_type == "olmo2" else "pre",
        **_rope(r, model_type, max_pos),
        **_layer_types(r, model_type, n_layers),
    )
    if gemma:
        fields.update(
            mlp="geglu",
            embed_scale=d**0.5,
            query_scale_dim=float(r.get("query_pre_attn_scalar")),
            attn_softcap=r.get("attn_logit_softcapping"),
            final_softcap=r.get("final_logit_softcapping"),
        )
    return fields


def _number(x):
    """An int where the value is integral (transformers' typed configs want int fields)."""
    return int(x) if float(x).is_integer() else float(x)


def default_decoder_type(cfg: ModelConfig) -> str:
    """The decoder model_type a llama-family config exports to when none is named."""
    if cfg.norm_placement == "peri" and cfg.mlp == "geglu":
        return "gemma3_text" if cfg.qk_norm or cfg.local_rope_theta else "gemma2"
    if cfg.norm_placement == "out":
        return "olmo2"
    if cfg.rope_fraction != 1.0:
        return "phi3"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "mistral" if cfg.local_rows else "llama"


def to_hf_decoder(cfg: ModelConfig, model_type: str, head: dict) -> dict[str, Any]:
    """The config.json dictionary of a llama-family `cfg` as decoder `model_type`."""
    gemma = model_type in GEMMA_TYPES
    expect(
        cfg,
        model_type,
        norm="rms",
        position="rope",
        causal=True,
        type_vocab_size=0,
        embed_norm=False,
        final_norm=True,
        norm_placement="peri" if gemma else "out" if model_type == "olmo2" else "pre",
        mlp="geglu" if gemma else "swiglu",
        qk_norm={"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}.get(model_type),
    )
    if model_type == "qwen2":
        expect(cfg, model_type, qkv_bias=True, bias=False)
    elif model_type == "llama":
        expect(cfg, model_type, qkv_bias=cfg.bias)
    else:
        expect(cfg, model_type, qkv_bias=False, bias=False)
    if gemma:
        if cfg.embed_scale is None or not math.isclose(cfg.embed_scale, cfg.d_model**0.5):
            raise HFError(
                f"cannot export to {model_type}: it scales embeddings by "
                f"sqrt(d_model)={cfg.d_model**0.5:g}, the model by {cfg.embed_scale}"
            )
    else:
        expect(
            cfg,
            model_type,
            embed_scale=None,
            query_scale_dim=None,
            attn_softcap=None,
            final_softcap=None,
        )
    if model_type != "phi3":
        expect(cfg, model_type, rope_fraction=1.0)
    if (
        model_type == "phi3"
        and cfg.rope_scaling is not None
        and cfg.rope_scaling.type != "longrope"
    ):
        raise HFError(
            f"cannot export to phi3: it supports longrope scaling only, the model "
            f"has {cfg.rope_scaling.type}"
        )
    out = {
        **head,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **_write_rope(cfg, model_type),
        **_write_layer_types(cfg, model_type),
    }
    if gemma:
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            query_pre_attn_scalar=_number(
                cfg.head_dim if cfg.query_scale_dim is None else cfg.query_scale_dim
            ),
            attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=cfg.final_softcap,
        )
        if model_type == "gemma2" and cfg.local_rope_theta is not None:
            raise HFError("cannot export to gemma2: a separate local RoPE base is gemma3's")
    else:
        out["hidden_act"] = "silu"
    if _DEFAULT_PAD.get(model_type, -1) >= cfg.vocab_size:
        out["pad_token_id"] = None  # the default row would not exist in this vocabulary
    if model_type in ("llama", "qwen3", "olmo2"):
        out["attention_bias"] = cfg.bias
    if model_type == "llama":
        out["mlp_bias"] = cfg.bias
    return out
