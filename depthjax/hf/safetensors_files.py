"""Reading and writing the safetensors files of a local Hugging Face directory.

Layouts: a single `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed
by `model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}). Reading is
tensor by tensor into owned arrays (no memory map); writing makes each tensor as it is
written (two in memory at a time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import numpy as np

from ..files import safetensors_io as st_io
from .config import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def inside(directory: str, name, where: str) -> str:
    """directory/name, refusing names that are not relative paths inside `directory`
    (absolute, `..`, or a symlink out of it): a checkpoint reads only its own files."""
    if not isinstance(name, str) or not name:
        raise HFError(f"{where} names {name!r}, which is not a file name")
    path = os.path.join(directory, name)
    root = os.path.realpath(directory)
    if os.path.isabs(name) or os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise HFError(
            f"{where} names {name!r}, a path outside the model directory "
            f"{directory}; refusing to read it"
        )
    return path


class Checkpoint:
    """The tensors of one directory: every shard's header is read (and checked) up front,
    tensor data on demand with `pread` into arrays the caller owns (no memory map, so
    nothing of the file stays resident; see depthjax.files.safetensors_io). Reads are
    thread-safe. Use as a context manager."""

    def __init__(self, directory: str):
        self.directory = directory
        self._files: dict[str, object] = {}
        self._infos: dict[str, dict[str, st_io.TensorInfo]] = {}
        index_path = os.path.join(directory, INDEX)
        single_path = os.path.join(directory, SINGLE)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise HFError(
                    f"{index_path} is not a safetensors index with a weight_map: {e}"
                ) from None
            if not isinstance(weight_map, dict):
                raise HFError(f"{index_path}: weight_map must map tensor names to files")
            self.weight_map = {
                name: inside(directory, file, INDEX) for name, file in weight_map.items()
            }
            for name, path in self.weight_map.items():
                if not os.path.exists(path):
                    raise HFError(
                        f"{INDEX} puts tensor {name!r} in {os.path.basename(path)}, "
                        "which does not exist"
                    )
        elif os.path.exists(single_path):
            self.weight_map = dict.fromkeys(self._infos_of(single_path), single_path)
        else:
            others = sorted(
                f
                for f in os.listdir(directory)
                if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))
            )
            hint = f" (found {others}; only safetensors are read)" if others else ""
            raise HFError(f"no {SINGLE} or {INDEX} in {directory}{hint}")
        for name, path in self.weight_map.items():
            if name not in self._infos_of(path):
                raise HFError(
                    f"{INDEX} lists tensor {name!r} in {os.path.basename(path)}, "
                    "but that file does not contain it"
                )

    def _infos_of(self, path: str) -> dict[str, st_io.TensorInfo]:
        if path not in self._infos:
            try:
                self._files[path] = open(path, "rb")  # closed by close()
                self._infos[path], _ = st_io.read_header(self._files[path], path)
            except (st_io.SafetensorsError, OSError) as e:
                raise HFError(
                    f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
                ) from None
        return self._infos[path]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def info(self, name: str) -> st_io.TensorInfo:
        return self._infos_of(self.weight_map[name])[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(self.info(name).nbytes for name in self.weight_map)

    def _checked(self, name: str) -> st_io.TensorInfo:
        info = self.info(name)
        if not (np.issubdtype(info.dtype, np.floating) or info.dtype.name == "bfloat16"):
            raise HFError(f"tensor {name!r} has dtype {info.dtype}, expected floating point")
        return info

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Fill the C-contiguous array `out` (the tensor's shape) with the tensor: straight
        from the file when the dtypes agree, else through a cast."""
        info, path = self._checked(name), self.weight_map[name]
        try:
            if info.dtype == out.dtype:
                st_io.read_into(self._files[path].fileno(), info, out)
            else:
                out[...] = st_io.read(self._files[path].fileno(), info)
        except (st_io.SafetensorsError, OSError) as e:
            raise HFError(
                f"cannot read tensor {name!r} from {os.path.basename(path)}: {e}"
            ) from None

    def get(self, name: str) -> np.ndarray:
        """One tensor as a new numpy array of its stored floating dtype (bfloat16 stays
        bfloat16)."""
        out = np.empty(self.shape(name), self._checked(name).dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _shard_plan(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
    shards, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    return shards + [current]


def write(
    directory: str,
    items: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    *,
    max_shard_bytes: int,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write tensors given as (name, shape, dtype, make_array) into `directory`, each made
    as it is written (two tensors in memory at a time). One shard: model.safetensors; more:
    shards plus the index. Returns the file names written."""
    items = list(items)
    sizes = [
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize for _, shape, dt, _ in items
    ]
    plan = _shard_plan(sizes, max_shard_bytes)
    files = (
        [SINGLE]
        if len(plan) == 1
        else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    )
    weight_map = {}
    for file, members in zip(files, plan):
        st_io.write(
            os.path.join(directory, file), [items[j] for j in members], metadata={"format": "pt"}
        )
        weight_map.update({items[j][0]: file for j in members})
        if progress:
            progress(
                f"wrote {file} ({len(members)} tensors, "
                f"{sum(sizes[j] for j in members) / 2**20:.1f} MiB)"
            )
    if len(plan) > 1:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump(
                {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2
            )
        files.append(INDEX)
    return files
