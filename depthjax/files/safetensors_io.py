"""Reading safetensors files without memory maps: the header, then each tensor's bytes with
`os.preadv` straight into a numpy array the caller owns.

Memory-mapped reading (safetensors' `safe_open`) leaves every touched page of the file
resident in the process (counted in its RSS until the file is closed), so a loader that
copies tensors out of a map holds the checkpoint twice. Reading into owned arrays holds it
once; `pread` is thread-safe and releases the GIL, so layers are read in parallel threads.

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data (offsets relative to
its start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from ..errors import DepthjaxError
from . import atomic

# safetensors dtype codes <-> numpy dtypes (bfloat16 through ml_dtypes)
DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class SafetensorsError(DepthjaxError):
    """A file that is not a well-formed safetensors file (corrupt or truncated)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(f, path) -> tuple[dict[str, TensorInfo], dict]:
    """({name: TensorInfo}, metadata) of the safetensors file open as `f` (binary) at
    `path`, every entry checked against the file's size; SafetensorsError names what is
    wrong."""
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {len(head)} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} exceeds the file ({size} B)")
        raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: {e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, out = 8 + n, {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: malformed header entry for {name!r} ({e})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} {entry['dtype']}{list(shape)} has data offsets "
                f"[{begin}, {end}] ({end - begin} bytes, {nbytes} expected)"
            )
        if start + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at byte {start + end}, past the end of the "
                f"file ({size} B; truncated?)"
            )
        out[name] = TensorInfo(dtype, shape, start + begin, nbytes)
    return out, metadata


def read_into(fd: int, info: TensorInfo, out: np.ndarray) -> np.ndarray:
    """Fill the C-contiguous `out` (info's byte size) with the tensor's bytes; returns
    `out` viewed with the tensor's dtype and shape."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    if buf.nbytes != info.nbytes:
        raise ValueError(f"buffer of {buf.nbytes} B for a tensor of {info.nbytes} B")
    done = 0
    while done < info.nbytes:
        got = os.preadv(fd, [buf[done:]], info.offset + done)
        if got <= 0:
            raise SafetensorsError(f"unexpected end of file reading {info.nbytes} B")
        done += got
    return out.reshape(-1).view(info.dtype).reshape(info.shape)


def read(fd: int, info: TensorInfo) -> np.ndarray:
    """The tensor as a new array of its stored dtype."""
    return read_into(fd, info, np.empty(info.shape, info.dtype))


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """np.empty aligned to `align` bytes: jax's CPU backend adopts such a host array as a
    device buffer without copying it (numpy's own allocations are 16-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start : start + nbytes].view(dtype).reshape(shape)


_CODES = {dtype: code for code, dtype in DTYPES.items()}


def write(path, tensors, metadata: dict[str, str] | None = None, hasher=None) -> None:
    """Write a safetensors file from `tensors`: (name, shape, dtype, make) with `make()`
    returning that array, called in order as the file is written (the next one on a worker
    thread while this one is written), so memory holds two tensors beyond the caller's (no
    serialized copy of the file). Flushed to disk before returning. `hasher` (e.g.
    hashlib.sha256()) is fed every byte of the file in order, on the worker thread, so
    the caller has the file's digest without reading it back."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it

    def made(name, shape, dtype, make):
        array = np.ascontiguousarray(make())
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise SafetensorsError(
                f"tensor {name!r} is {array.dtype}{list(array.shape)}, announced as "
                f"{np.dtype(dtype)}{list(shape)}"
            )
        if hasher is not None:  # one worker, tensors in order: the file's byte order
            hasher.update(memoryview(array.reshape(-1).view(np.uint8)))
        return array

    # The next tensor is made on a worker thread while this one is written (both release
    # the GIL), so memory holds two tensors beyond the caller's at most.
    with open(path, "wb") as f, ThreadPoolExecutor(1) as worker:
        head = struct.pack("<Q", len(raw)) + raw
        f.write(head)
        if hasher is not None:
            hasher.update(head)
        pending = worker.submit(made, *tensors[0]) if tensors else None
        for k in range(len(tensors)):
            array = pending.result()
            if k + 1 < len(tensors):
                pending = worker.submit(made, *tensors[k + 1])
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            f.flush()
            atomic.start_writeback(f.fileno())  # the disk works while the next one is made
            del array
        f.flush()
        os.fsync(f.fileno())


def read_all(path, hasher=None) -> dict[str, np.ndarray]:
    """Every tensor of a file as its own 64-byte aligned array, reading the file once in
    order; `hasher` (e.g. hashlib.sha256()) is fed every byte of the file, so the caller
    can check a digest without reading the file twice. The data must be contiguous (as
    every writer lays it out)."""
    with open(path, "rb") as f:
        infos, _ = read_header(f, path)
        data_start = f.tell()
        if hasher is not None:
            f.seek(0)
            hasher.update(f.read(data_start))
        end, out = data_start, {}
        for name, info in sorted(infos.items(), key=lambda kv: kv[1].offset):
            if info.offset != end:
                raise SafetensorsError(f"{path}: tensor {name!r} does not follow the previous one")
            out[name] = read_into(f.fileno(), info, aligned_empty(info.shape, info.dtype))
            if hasher is not None:
                hasher.update(memoryview(out[name].reshape(-1).view(np.uint8)))
            end += info.nbytes
        size = os.fstat(f.fileno()).st_size
    if end != size:
        raise SafetensorsError(f"{path}: {size - end} bytes after the last tensor")
    return out
