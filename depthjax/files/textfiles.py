"""Documents from local text files: .txt (one document each) and .jsonl (one per line, a
string field), light to import (no grain or TFDS), shared by training data and evaluation."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from ..errors import DepthjaxError


class DataError(DepthjaxError):
    """Data that cannot be read or does not fit the model."""


def expand_files(patterns) -> list[Path]:
    """Sorted files matching the given paths / globs / directories (*.txt, *.jsonl inside)."""
    files = set()
    for pattern in [patterns] if isinstance(patterns, (str, os.PathLike)) else patterns:
        pattern = str(pattern)
        if os.path.isdir(pattern):
            matches = [
                p
                for ext in ("txt", "jsonl")
                for p in glob.glob(os.path.join(pattern, "**", f"*.{ext}"), recursive=True)
            ]
        else:
            matches = glob.glob(pattern, recursive=True)
        if not matches:
            raise DataError(f"data files: nothing matches {pattern!r}")
        files.update(Path(m).resolve() for m in matches)
    return sorted(files)


def read_documents(path: Path, text_key: str = "text"):
    """(key, text) of each document in one file; a .jsonl line that is not an object with a
    string `text_key` raises DataError naming the file and line."""
    path = Path(path)
    text = _utf8(path)
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(
                    f"{path}:{i + 1}: expected an object with a string field {text_key!r}"
                )
            yield f"{path.name}:{i}", record[text_key]
    else:
        yield path.name, text


def _utf8(path: Path) -> str:
    """The file's text; DataError naming the first byte that is not UTF-8 (nothing is
    replaced silently: a binary file is not a corpus)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text: byte {e.start} (0x{data[e.start]:02x}) cannot be "
            "decoded; data files must be UTF-8 text or JSONL"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as open() in text mode reads
