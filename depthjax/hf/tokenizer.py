"""Tokenizers of Hugging Face directories, read from tokenizer.json by `tokenizers`."""

from __future__ import annotations

import os
import shutil

from .config import HFError

# Files that make up a tokenizer in a Hugging Face directory (copied on conversion).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)


def load_tokenizer(path: str):
    """The `tokenizers.Tokenizer` of a directory (or of a tokenizer.json file itself)."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise HFError(f"no tokenizer.json in {path} (only the fast-tokenizer format is read)")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise HFError(f"{file} is not a valid tokenizer.json: {e}") from None


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy the tokenizer (and generation) files of `src` into `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
