"""The embedded default corpus: the source files of the running Python's standard library.

Real text that is present on every machine, so nothing is downloaded. Files are split
into train and validation deterministically by a hash of their path relative to the
stdlib root.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import numpy as np

from .textfiles import DataError


def _stdlib_sources(valid_fraction: float) -> list[tuple[str, Path, str]]:
    """(path relative to the stdlib root, path, split) of every corpus file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in "/" + rel:
            continue
        h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "little") / 2**32
        out.append((rel, path, "valid" if h < valid_fraction else "train"))
    if not out:
        raise RuntimeError(f"no standard library sources found under {root}")
    return out


def stdlib_files(split: str = "train", valid_fraction: float = 0.05) -> list[Path]:
    """Sorted .py files of the standard library (site-packages excluded) in `split`."""
    if split not in ("train", "valid"):
        raise DataError(f"split must be 'train' or 'valid', got {split!r}")
    return [path for _, path, s in _stdlib_sources(valid_fraction) if s == split]


def describe(valid_fraction: float = 0.05) -> dict:
    """What the embedded corpus is on this machine: the Python version, the file and byte
    counts per split, and a SHA-256 over every file's relative path and content digest (in
    path order). Two machines with the same digest read the same corpus; a different
    standard library shows up as a different digest, not as a silent change of results."""
    total, counts, nbytes = hashlib.sha256(), {"train": 0, "valid": 0}, 0
    for rel, path, split in _stdlib_sources(valid_fraction):
        data = path.read_bytes()
        total.update(f"{split}\0{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        counts[split] += 1
        nbytes += len(data)
    return {
        "name": f"Python {platform.python_version()} standard library sources",
        "files": counts,
        "bytes": nbytes,
        "sha256": total.hexdigest(),
    }


def sample_windows(
    batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train", encode=None
):
    """int32 [batch_size, seq_len] token windows drawn deterministically from the corpus.

    encode: text bytes -> int token ids (default: the bytes themselves, vocab 256)."""
    encode = encode or (lambda data: np.frombuffer(data, np.uint8))
    rng = np.random.default_rng(seed)
    files = stdlib_files(split)
    out = np.zeros((batch_size, seq_len), np.int32)
    for b in range(batch_size):
        ids = np.zeros(0, np.int32)
        for _ in range(1000):
            ids = np.asarray(encode(files[rng.integers(len(files))].read_bytes()))
            if len(ids) > seq_len:
                break
        else:
            raise DataError(f"no corpus file is longer than seq_len={seq_len} tokens")
        start = rng.integers(len(ids) - seq_len)
        out[b] = ids[start : start + seq_len]
    return out


def stream_windows(token_stream, batch_size: int, seq_len: int, *, seed: int = 0):
    """int32 [batch_size, seq_len] windows at seeded random offsets of one token stream
    (e.g. a user's documents encoded and joined)."""
    stream = np.asarray(token_stream, np.int32)
    if stream.size < seq_len:
        raise ValueError(f"the data has {stream.size} tokens, fewer than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, stream.size - seq_len + 1, batch_size)
    return np.stack([stream[s : s + seq_len] for s in starts])
