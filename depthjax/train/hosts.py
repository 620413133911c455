"""What the processes of a multi-host run must agree on, in one place: a problem any of
them found, their JSON states, a barrier. Each is free with one process (no collectives).

Every function is a collective when there are several processes: all of them must call
it, in the same order.
"""

from __future__ import annotations

import json

import jax
import numpy as np


def gather_text(text: str) -> list[str]:
    """Every process's `text`, in process order."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8)
    n = int(np.max(multihost_utils.process_allgather(np.int32(data.size))))
    padded = np.zeros(max(n, 1), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


def first_problem(problem: str | None) -> str | None:
    """The first non-empty problem reported by any process (None when there is none), so
    that all of them take the same branch."""
    return next((p for p in gather_text(problem or "") if p), None)


def merged_json(local: dict) -> dict:
    """The union of every process's dict (keys of different processes may overlap only
    with equal values)."""
    merged: dict = {}
    for text in gather_text(json.dumps(local, sort_keys=True)):
        merged.update(json.loads(text))
    return merged


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
