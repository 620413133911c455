"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), so an exported file runs on its own.

Both tokenizers depthjax reads travel as llama.cpp's byte-level BPE vocabulary ("gpt2"):

* depthjax's byte tokenizer: 256 tokens, token i the GPT-2 byte-to-unicode character of
  byte i, and no merge that can apply, so llama.cpp splits any text into its UTF-8
  bytes, token = byte;
* a Hugging Face tokenizer.json with a byte-level BPE model: its vocabulary, merges and
  added tokens (special ones as control tokens), with llama.cpp's pre-tokenizer named
  from the tokenizer's own pre-tokenizer (`PRE_TOKENIZERS`). Anything else (WordPiece,
  Unigram, byte-fallback BPE, a regex llama.cpp does not know) is refused by name.

Vocabulary rows past the tokenizer's tokens get unused "[PAD{i}]" tokens, as llama.cpp's
own converter writes them.
"""

from __future__ import annotations

import json

from ..files.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer
from .layout import GGUFError

# Split regexes of tokenizer.json pre-tokenizers and the llama.cpp pre-tokenizer that
# applies the same split (llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3, _QWEN2).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}  # ByteLevel with its regex: "gpt-2"
# llama.cpp needs a merges list and gguf's writer refuses an empty one: the byte vocabulary
# carries one merge that never applies (its left side has two characters, and no merge
# makes a two-character symbol), so every byte stays one token.
_NEVER_MERGED = "\u0100\u0100 \u0100"
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # gguf.TokenType


def byte_unicode() -> list[str]:
    """GPT-2's printable stand-in character of each byte (what byte-level BPE stores)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _pre_tokenizer(pre) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or GGUFError naming it."""
    if pre is None:
        raise GGUFError("tokenizer.json has no pre_tokenizer; llama.cpp needs a byte-level one")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise GGUFError("tokenizer.json ByteLevel add_prefix_space=True: llama.cpp has none")
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[1].get("type") == "ByteLevel"
        and not parts[1].get("use_regex", True)
    ):
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
        raise GGUFError(f"tokenizer.json splits by the regex {regex!r}, which llama.cpp lacks")
    raise GGUFError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)[:120]} has no llama.cpp counterpart "
        "(byte-level BPE: ByteLevel, or a llama3 / qwen2 Split + ByteLevel)"
    )


def _json_vocab(spec: dict) -> tuple[list[str], list[int], list[str], str]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE" if model.get("byte_fallback") else model.get("type")
        raise GGUFError(
            f"tokenizer.json model {kind!r}: only byte-level BPE tokenizers export to GGUF"
        )
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise GGUFError(f"tokenizer.json normalizer {normalizer.get('type')!r}: llama.cpp has none")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    tokens = {i: t for t, i in model["vocab"].items()}
    types = {i: _NORMAL for i in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    n = max(tokens) + 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return (
        [tokens.get(i, f"[PAD{i}]") for i in range(n)],
        [types.get(i, _UNUSED) for i in range(n)],
        merges,
        pre,
    )


def metadata(tokenizer, vocab_size: int) -> dict:
    """The tokenizer's GGUF fields: tokens, types, merges, pre (a llama.cpp name).
    `tokenizer`: depthjax's ByteTokenizer or JsonTokenizer, a `tokenizers.Tokenizer`, or
    a spec for `load_tokenizer` ('byte' or the path of a tokenizer.json)."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        tokens, types, pre = byte_unicode(), [_NORMAL] * 256, "default"
        merges = [_NEVER_MERGED]
    else:
        backend = tokenizer.backend if isinstance(tokenizer, JsonTokenizer) else tokenizer
        if not hasattr(backend, "to_str"):
            raise GGUFError(
                f"tokenizer {type(tokenizer).__name__}: pass 'byte', a tokenizer.json path, "
                "depthjax's tokenizers or a tokenizers.Tokenizer"
            )
        tokens, types, merges, pre = _json_vocab(json.loads(backend.to_str()))
    if len(tokens) > vocab_size:
        raise GGUFError(
            f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}"
        )
    pad = range(len(tokens), vocab_size)
    return dict(
        tokens=tokens + [f"[PAD{i}]" for i in pad],
        types=types + [_UNUSED] * len(pad),
        merges=merges,
        pre=pre,
    )
