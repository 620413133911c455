"""Reading safetensors files without memory maps: the header, then each tensor's bytes with
`os.preadv` straight into a numpy array the caller owns.

Memory-mapped reading (safetensors' `safe_open`) leaves every touched page of the file
resident in the process (counted in its RSS until the file is closed), so a loader that
copies tensors out of a map holds the checkpoint twice. Reading into owned arrays holds it
once; `pread` is thread-safe, so shards and layers can be read in parallel threads (the
reads and numpy's copies release the GIL).

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data (offsets relative to
its start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

from ..errors import DepthjaxError

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


def read_header(path) -> tuple[dict[str, TensorInfo], dict]:
    """({name: TensorInfo}, metadata) of a safetensors file, every entry checked against
    the file's size; SafetensorsError names what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
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


def copy_into(dst: np.ndarray, src) -> None:
    """dst[...] = src (casting), fast for transposed views: numpy copies a transposed
    view element by element with cache misses on every read, so the copy goes in slabs of
    16 along the axis that src strides farthest, each slab reading contiguous source rows."""
    if dst.dtype == src.dtype and dst.dtype.itemsize == 2:  # native copy loops for bf16
        dst, src = dst.view(np.uint16), src.view(np.uint16)
    if src.ndim < 2 or src.flags.c_contiguous:
        np.copyto(dst, src, casting="unsafe")
        return
    ax = int(np.argmax(src.strides))
    if ax == 0:
        np.copyto(dst, src, casting="unsafe")
        return
    index = [slice(None)] * src.ndim
    for j in range(0, src.shape[ax], 16):
        index[ax] = slice(j, j + 16)
        np.copyto(dst[tuple(index)], src[tuple(index)], casting="unsafe")
