"""Tokenizers: UTF-8 bytes, or a Hugging Face `tokenizer.json` through `tokenizers`, and the
one resolver of which tokenizer goes with a model directory (`tokenizer_for`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DepthjaxError


class TokenizerError(DepthjaxError):
    """A tokenizer that cannot be read or does not fit the model."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no special tokens, lossless."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"cannot read tokenizer {path}: {e}") from None
        # tokenizer.json's truncation and padding (all-MiniLM's max_length 128) are for
        # single model inputs: documents and task text are encoded whole, then cut by us.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` (its JSON travels into GGUF files)."""
        return self._tok

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode(np.asarray(ids).tolist())


def load_tokenizer(spec: str):
    """'byte' or the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).is_file():
        raise TokenizerError(f"tokenizer={spec!r}: expected 'byte' or an existing tokenizer.json")
    return JsonTokenizer(spec)


def tokenizer_for(model_dir, vocab_size: int, spec: str | None = None):
    """The tokenizer of a model directory: `spec` ('byte' or a tokenizer.json) when given,
    else the directory's tokenizer.json, else bytes for a 256-token vocabulary. Refuses a
    tokenizer with more tokens than the model's vocabulary."""
    if spec is None:
        file = Path(model_dir) / "tokenizer.json"
        if file.is_file():
            spec = str(file)
        elif vocab_size == 256:
            spec = "byte"
        else:
            raise TokenizerError(
                f"{model_dir} has no tokenizer.json and the vocabulary "
                f"({vocab_size}) is not byte-level; pass a tokenizer"
            )
    tok = load_tokenizer(spec)
    if tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {spec} has {tok.vocab_size} tokens but the model's "
            f"vocabulary is {vocab_size}"
        )
    return tok
