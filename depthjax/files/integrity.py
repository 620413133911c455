"""Integrity records: the SHA-256 of every file of a checkpoint, in a self-checking JSON
record, verified before anything is restored.

A *sealed* JSON file is written in one canonical form (sorted keys, fixed separators,
ASCII) and carries the SHA-256 of that form without its own "sha256" field. A reader
re-serializes what it parsed and demands the same bytes and the same digest, so no change
to the file goes unnoticed -- not even one that parses to the same value (`1e-08` vs
`1E-08`).

`seal(directory)` writes such a record listing every file below `directory`;
`verify(directory)` raises IntegrityError naming the first file that is missing, changed
or unexpected. Training checkpoints (depthjax.train.checkpoints) and native checkpoints
(depthjax.files.checkpoint, whose manifest is a sealed record) both use these.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DepthjaxError

RECORD = "depthjax-integrity.json"
FORMAT = "depthjax-integrity"


class IntegrityError(DepthjaxError):
    """A checkpoint whose files do not match their integrity record (bit rot, truncation,
    an edit after saving, or a save that never finished)."""


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


PIECE_BYTES = 16 * 2**20
HASH_THREADS = min(4, os.cpu_count() or 1)  # hashlib releases the GIL while it hashes


class PieceDigest:
    """hashlib-like digest of a byte stream that hashes on several threads: SHA-256 over
    the concatenated SHA-256 digests of the stream's consecutive `piece_bytes` pieces (the
    last one shorter; an empty stream is one empty piece).

    One SHA-256 is sequential (~1.8 GB/s here); pieces are hashed as they fill, on
    `workers` threads (hashlib releases the GIL), so a writer or reader that feeds it is
    not held to one core's hashing speed. `update` keeps a view of its data, no copy: the
    caller must not change the data afterwards. The digest depends on `piece_bytes`, which
    a record must therefore state beside it."""

    def __init__(self, piece_bytes: int | None = None, workers: int | None = None):
        piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
        if not isinstance(piece_bytes, int) or piece_bytes <= 0:
            raise ValueError(f"piece_bytes must be a positive int, got {piece_bytes!r}")
        self.piece_bytes = piece_bytes
        self._pool = ThreadPoolExecutor(workers or HASH_THREADS)
        self._pieces = []  # futures of the pieces' digests, in stream order
        self._open: list[memoryview] = []  # the unfinished piece
        self._filled = 0
        self._digest: bytes | None = None

    def update(self, data) -> None:
        if self._digest is not None:
            raise ValueError("update() after digest()")
        view = memoryview(data).cast("B")
        while view.nbytes:
            take = min(self.piece_bytes - self._filled, view.nbytes)
            self._open.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.piece_bytes:
                self._close_piece()

    def _close_piece(self) -> None:
        parts, self._open, self._filled = self._open, [], 0
        self._pieces.append(self._pool.submit(_sha256_of, parts))

    def digest(self) -> bytes:
        if self._digest is None:
            if self._open or not self._pieces:
                self._close_piece()
            self._digest = hashlib.sha256(b"".join(p.result() for p in self._pieces)).digest()
            self._pool.shutdown()
            self._pieces = []
        return self._digest

    def hexdigest(self) -> str:
        return self.digest().hex()


def _sha256_of(parts: list[memoryview]) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def _sha256_files(paths) -> list[str]:
    """sha256_file of each path, on HASH_THREADS threads."""
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(sha256_file, paths))


def canonical(obj) -> bytes:
    return (
        json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode()


def dump_sealed(obj: dict) -> bytes:
    """The canonical bytes of `obj` plus a "sha256" field over the rest."""
    body = {k: v for k, v in obj.items() if k != "sha256"}
    return canonical({**body, "sha256": hashlib.sha256(canonical(body)).hexdigest()})


def write_sealed(path, obj: dict) -> None:
    """Write a sealed JSON file atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(dump_sealed(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_sealed(path) -> dict:
    """Parse a sealed JSON file; IntegrityError unless it is byte-for-byte what
    `dump_sealed` wrote."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path.name} is missing") from None
    return parse_sealed(raw, path.name)


def parse_sealed(raw: bytes, name: str) -> dict:
    """`load_sealed` of bytes already read (from the file `name`)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sha256"), str):
        raise IntegrityError(f"{name} is not a sealed record (no sha256 field)")
    if raw != dump_sealed(obj):  # dump_sealed recomputes the digest from the body
        raise IntegrityError(
            f"{name} was modified after it was written (its bytes do not match its own checksum)"
        )
    return obj


def list_files(directory) -> list[str]:
    """Relative posix paths of every file below `directory` except the integrity record."""
    directory = Path(directory)
    return sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != RECORD
    )


def file_digests(directory, names=None) -> dict[str, str]:
    """{relative posix path: sha256} of `names` (default: `list_files(directory)`)."""
    directory = Path(directory)
    names = list_files(directory) if names is None else list(names)
    return dict(zip(names, _sha256_files([directory / name for name in names])))


def check_digests(directory, expected: dict[str, str]) -> None:
    """Raise IntegrityError for the first listed file that is missing, lies outside
    `directory`, or whose digest differs."""
    names = sorted(expected)
    found = _sha256_files([_listed(directory, name) for name in names])
    for name, digest in zip(names, found):
        if digest != expected[name]:
            raise IntegrityError(MISMATCH.format(name))


def read_checked(directory, name: str, digest: str) -> bytes:
    """The bytes of one listed file, read once and checked against `digest` (so a loader
    that parses a file need not read it a second time to verify it)."""
    data = _listed(directory, name).read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(MISMATCH.format(name))
    return data


MISMATCH = "{} does not match its SHA-256 (bit rot, truncation or an edit after saving)"


def _listed(directory, name: str) -> Path:
    """directory/name of a listed file; IntegrityError if it is outside or missing."""
    directory = Path(directory)
    file = directory / name
    if not Path(os.path.realpath(file)).is_relative_to(os.path.realpath(directory)):
        raise IntegrityError(f"the record lists {name!r}, a path outside {directory}")
    if not file.is_file():
        raise IntegrityError(f"{name} is missing")
    return file


def seal(directory, **info) -> None:
    """Write RECORD into `directory`: the digest of every file below it (and `info`)."""
    write_sealed(
        Path(directory) / RECORD,
        {"format": FORMAT, "version": 1, **info, "files": file_digests(directory)},
    )


def is_sealed(directory) -> bool:
    return (Path(directory) / RECORD).exists()


def verify(directory, *, share: tuple[int, int] = (0, 1)) -> None:
    """Raise IntegrityError unless every file below `directory` is exactly as sealed.

    share=(i, n): check only every n-th listed file starting at i (processes of a
    multi-host job split the reading); the record itself and the set of files are always
    checked in full."""
    directory = Path(directory)
    record = load_sealed(directory / RECORD)
    files = record.get("files")
    if record.get("format") != FORMAT or not isinstance(files, dict):
        raise IntegrityError(f"{RECORD} is not a depthjax integrity record")
    names = list_files(directory)
    missing = sorted(set(files) - set(names))
    if missing:
        raise IntegrityError(f"{missing[0]} is missing")
    i, n = share
    mine = {k: files[k] for k in sorted(files)[i::n]}
    check_digests(directory, mine)
    extra = sorted(set(names) - set(files))
    if extra:
        raise IntegrityError(f"{extra[0]} is not part of the checkpoint as it was written")
