"""Reading and writing the safetensors files of a local Hugging Face directory.

Layouts: a single `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` listed
by `model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}). Reading is
memory-mapped and tensor by tensor; writing holds one shard in memory at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .config import HFError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of one directory, opened lazily; use as a context manager."""

    def __init__(self, directory: str):
        self.directory = directory
        self._files: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}
        self._stack = contextlib.ExitStack()
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
            self.weight_map = {
                name: os.path.join(directory, file) for name, file in weight_map.items()
            }
            for name, path in self.weight_map.items():
                if not os.path.exists(path):
                    raise HFError(
                        f"{INDEX} puts tensor {name!r} in {os.path.basename(path)}, "
                        "which does not exist"
                    )
        elif os.path.exists(single_path):
            self.weight_map = dict.fromkeys(self._keys_of(single_path), single_path)
        else:
            others = sorted(
                f
                for f in os.listdir(directory)
                if f.endswith((".bin", ".pt", ".pth", ".h5", ".msgpack"))
            )
            hint = f" (found {others}; only safetensors are read)" if others else ""
            raise HFError(f"no {SINGLE} or {INDEX} in {directory}{hint}")
        for name, path in self.weight_map.items():
            if name not in self._keys_of(path):
                raise HFError(
                    f"{INDEX} lists tensor {name!r} in {os.path.basename(path)}, "
                    "but that file does not contain it"
                )

    def _open(self, path: str):
        if path not in self._files:
            try:
                self._files[path] = self._stack.enter_context(safe_open(path, framework="np"))
            except (SafetensorError, OSError) as e:
                raise HFError(
                    f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
                ) from None
        return self._files[path]

    def _keys_of(self, path: str) -> set[str]:
        if path not in self._keys:
            self._keys[path] = set(self._open(path).keys())
        return self._keys[path]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array."""
        try:
            array = self._open(self.weight_map[name]).get_tensor(name)
        except SafetensorError as e:
            raise HFError(
                f"cannot read tensor {name!r} from {os.path.basename(self.weight_map[name])}: {e}"
            ) from None
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
            raise HFError(f"tensor {name!r} has dtype {array.dtype}, expected floating point")
        return array.astype(np.float32, copy=False)

    def close(self) -> None:
        self._stack.close()

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
    items: Iterable[tuple[str, int, Callable[[], np.ndarray]]],
    *,
    max_shard_bytes: int,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write tensors given as (name, nbytes, make_array) into `directory`, one shard in
    memory at a time. One shard: model.safetensors; more: shards plus the index.
    Returns the file names written."""
    items = list(items)
    plan = _shard_plan([n for _, n, _ in items], max_shard_bytes)
    files = (
        [SINGLE]
        if len(plan) == 1
        else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    )
    weight_map = {}
    for file, members in zip(files, plan):
        tensors = {items[j][0]: np.ascontiguousarray(items[j][2]()) for j in members}
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        if progress:
            progress(
                f"wrote {file} ({len(tensors)} tensors, "
                f"{sum(t.nbytes for t in tensors.values()) / 2**20:.1f} MiB)"
            )
        del tensors
    if len(plan) > 1:
        total = sum(n for _, n, _ in items)
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        files.append(INDEX)
    return files
