"""`save(model, path)`: a DepthModel as one GGUF file that llama.cpp runs on its own.

The program is resolved as `dj.hf.save` resolves it (`depthjax.hf.exporting.export_plan`,
`depthjax.depth.fold`): one private layer per step, loops / reorders / ties materialized,
gates, per-step scales, LoRA and foldable recovery adapters folded into the weights, the
rest refused by name. Unlike a Hugging Face export, a gated-off sublayer is not computed:
the file is llama.cpp's `deci` architecture with per-layer head counts and feed-forward
lengths (depthjax.gguf.layout). Tensors follow llama.cpp's names ("blk.{i}.attn_q.weight",
...) and its RoPE: llama.cpp rotates adjacent pairs, depthjax (like Hugging Face) the two
halves of each head, so q and k rows are permuted per head as llama.cpp's converter does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core import rope
from ..core.model import DepthModel
from ..core.stitched import Stitched
from ..hf.exporting import export_plan, stitched_message
from . import layout, vocab
from .layout import GGUFError

DTYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK = 32  # values per q8_0 block along a row


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF export needs the `gguf` package (pip install gguf)") from None
    return gguf


def _pairs(rows: np.ndarray, heads: int) -> np.ndarray:
    """Rows [heads * Dh, ...] from half-split RoPE order to llama.cpp's adjacent pairs
    (convert_hf_to_gguf.py's `permute`)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


class _Tensors:
    """llama.cpp tensors (numpy layout: [out, in]) of one exported layer."""

    def __init__(self, folded, cfg):
        self.folded, self.cfg = folded, cfg
        self.paths = set(folded.paths)

    def leaf(self, step, *path):
        return np.asarray(self.folded.leaf(step, path), np.float32)

    def attention(self, step: int, kind: str):
        cfg, leaf = self.cfg, self.leaf
        D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out = {"attn_norm.weight": leaf(step, "attn_norm", "scale")}
        if kind == "zero":
            out["attn_output.weight"] = np.zeros((D, D), np.float32)
            return out
        for name, heads in (("q", H), ("k", K), ("v", K)):
            w = leaf(step, "attn", name, "kernel").reshape(D, heads * Dh).T
            out[f"attn_{name}.weight"] = w if name == "v" else _pairs(w, heads)
            if ("attn", name, "bias") in self.paths:
                b = leaf(step, "attn", name, "bias").reshape(heads * Dh)
                out[f"attn_{name}.bias"] = b if name == "v" else _pairs(b, heads)
        out["attn_output.weight"] = leaf(step, "attn", "o", "kernel").reshape(H * Dh, D).T
        if ("attn", "o", "bias") in self.paths:
            out["attn_output.bias"] = leaf(step, "attn", "o", "bias")
        return out

    def feed_forward(self, step: int, width: int):
        cfg, leaf = self.cfg, self.leaf
        D, F = cfg.d_model, cfg.d_ff
        out = {"ffn_norm.weight": leaf(step, "mlp_norm", "scale")}
        for name in ("gate", "up", "down"):
            shape = (width, D) if name != "down" else (D, width)
            out[f"ffn_{name}.weight"] = (
                leaf(step, "mlp", name, "kernel").T if width == F else np.zeros(shape, np.float32)
            )
            if ("mlp", name, "bias") in self.paths:
                bias = leaf(step, "mlp", name, "bias")  # down: the folded adapter bias, if any
                out[f"ffn_{name}.bias"] = bias if name == "down" or width == F else bias[:width] * 0
        return out


def _stored(gguf, array: np.ndarray, dtype: str):
    """(data, raw_dtype) of one tensor: norms and biases stay f32 (as llama.cpp's converter
    keeps them); q8_0 needs rows that are whole 32-value blocks, else f16."""
    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "q8_0" and array.shape[-1] % _Q8_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), q8), q8
    return array.astype(np.float16), None


def _rope_metadata(gguf, writer, cfg) -> dict[str, np.ndarray]:
    """RoPE keys, and the rope_freqs tensor of llama3 scaling (frequency divisors)."""
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    s = cfg.rope_scaling
    if s is None:
        return {}
    if s.type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(s.factor))
        return {}
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    scaled = np.asarray(rope.tables(cfg)[0][0], np.float64)
    return {"rope_freqs.weight": (plain / scaled).astype(np.float32)}


def save(
    model: DepthModel,
    path: str | os.PathLike,
    *,
    dtype: str = "f32",
    tokenizer=None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    drop_adapters: bool = False,
    overwrite: bool = False,
    name: str = "depthjax",
) -> dict:
    """Write `model` to the GGUF file `path` for llama.cpp (module docstring).

    dtype: "f32", "f16" or "q8_0" for the matrices (norms and biases stay f32; a matrix
    whose rows are not whole q8_0 blocks is stored f16). tokenizer: 'byte', a
    tokenizer.json path, depthjax's ByteTokenizer / JsonTokenizer or a
    `tokenizers.Tokenizer`; None means bytes for a 256-token vocabulary (anything else
    needs one). bos/eos_token_id go into the tokenizer metadata (llama.cpp adds the bos
    token to prompts only when bos_token_id is given). drop_adapters: as dj.hf.save.
    Returns {"architecture", "steps" (the exported step of each layer), "head_count",
    "head_count_kv", "feed_forward_length"} (per layer).
    """
    if isinstance(model, Stitched):
        raise GGUFError(stitched_message("one GGUF file"))
    gguf = _gguf()
    if dtype not in DTYPES:
        raise GGUFError(f"dtype={dtype!r} is not one of {DTYPES}")
    path = Path(path)
    if path.exists() and (path.is_dir() or not overwrite):
        raise GGUFError(
            f"{path} already exists; pass overwrite=True (convert --overwrite) to replace it"
            if not path.is_dir()
            else f"{path} is a directory; a GGUF export is one file"
        )
    layout.check(model.config)
    folded = export_plan(model, drop_adapters=drop_adapters, skip_gated=True, error=GGUFError)
    cfg = folded.config
    if tokenizer is None:
        if cfg.vocab_size != 256:
            raise GGUFError(
                f"the vocabulary has {cfg.vocab_size} tokens, not 256 bytes: pass the "
                "tokenizer (tokenizer='path/tokenizer.json') so the file runs on its own"
            )
        tokenizer = "byte"
    vocab_fields = vocab.metadata(tokenizer, cfg.vocab_size)
    arch, layers = layout.layers(model.program, cfg, keep=set(folded.late_bias))
    heads = [layer.head_counts(cfg) for layer in layers]

    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(len(layers))
    ff = [layer.ff for layer in layers]
    deci = arch == "deci"
    writer.add_feed_forward_length(ff if deci else cfg.d_ff)
    writer.add_head_count([h for h, _ in heads] if deci else cfg.n_heads)
    writer.add_head_count_kv([k for _, k in heads] if deci else cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    file_type = gguf.LlamaFileType
    writer.add_file_type(
        {"f32": file_type.ALL_F32, "f16": file_type.MOSTLY_F16, "q8_0": file_type.MOSTLY_Q8_0}[
            dtype
        ]
    )
    extra = _rope_metadata(gguf, writer, cfg)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab_fields["pre"])
    writer.add_token_list(vocab_fields["tokens"])
    writer.add_token_types(vocab_fields["types"])
    writer.add_token_merges(vocab_fields["merges"])
    if bos_token_id is not None:
        writer.add_bos_token_id(int(bos_token_id))
    if eos_token_id is not None:
        writer.add_eos_token_id(int(eos_token_id))
    writer.add_add_bos_token(bos_token_id is not None)

    def add(tensor_name, array):
        data, raw = _stored(gguf, np.asarray(array, np.float32), dtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw)

    add("token_embd.weight", folded.embed["tok"]["embedding"])
    tensors = _Tensors(folded, cfg)
    for i, layer in enumerate(layers):
        parts = tensors.attention(layer.step, layer.attn) if layer.attn != "none" else {}
        if layer.ff:
            parts.update(tensors.feed_forward(layer.step, layer.ff))
        for tensor_name, array in parts.items():
            add(f"blk.{i}.{tensor_name}", array)
    add("output_norm.weight", folded.head["norm"]["scale"])
    out = folded.head.get("out")
    add(
        "output.weight",
        np.asarray(out["kernel"]).T if out is not None else folded.embed["tok"]["embedding"],
    )
    for tensor_name, array in extra.items():
        writer.add_tensor(tensor_name, array)
    try:  # written beside, then renamed: a killed export leaves no half file at `path`
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {
        "architecture": arch,
        "steps": [layer.step for layer in layers],
        "head_count": [h for h, _ in heads],
        "head_count_kv": [k for _, k in heads],
        "feed_forward_length": ff,
    }
