"""What the processes of a multi-host run must agree on, in one place: a problem any of
them found, their JSON states, a barrier. Each is free with one process (no collectives).

Every function is a collective when there are several processes: all of them must call
it, in the same order.
"""

from __future__ import annotations

import collections
import json

import jax
import numpy as np

from ..errors import DepthjaxError

BARRIER_TIMEOUT_S = 3600  # data preparation or compilation on one process may take long


class HostLostError(DepthjaxError, RuntimeError):
    """A process of a multi-host run stopped answering (died, hung or was preempted); the
    run resumes from its last checkpoint when all processes are started again."""


_barriers: collections.Counter = collections.Counter()


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


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process got here. Through the coordination service, not a device
    collective: a device collective issued here could interleave with orbax's or the train
    step's on the other processes, and would wait out gloo's timeout, unnamed."""
    if jax.process_count() == 1:
        return
    _barriers[name] += 1  # every process passes the same barriers in the same order
    try:
        _client().wait_at_barrier(f"{name}-{_barriers[name]}", int(timeout_s * 1000))
    except Exception as e:  # the client raises its runtime's own error types
        raise lost(f"barrier {name!r}", e) from e


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def silent_processes() -> list[int] | None:
    """The processes the coordination service no longer hears from (None if it cannot
    say, e.g. because the coordinator itself is gone)."""
    try:
        live = _client().get_live_nodes(list(range(jax.process_count())))
    except Exception:
        return None
    return sorted(set(range(jax.process_count())) - set(live))


def lost(where: str, error: BaseException) -> HostLostError:
    """The named error for a collective or barrier that could not complete."""
    silent = silent_processes()
    who = (
        f"process(es) {', '.join(map(str, silent))} stopped answering"
        if silent
        else "another process stopped answering (the coordinator cannot say which)"
        if silent is None
        else "every process still answers the coordinator, so one of them hangs or "
        "took another code path"
    )
    first = " ".join(str(error).split())[:300]
    return HostLostError(
        f"process {jax.process_index()} of {jax.process_count()}: {where} could not "
        f"complete: {who} ({type(error).__name__}: {first}); restart all processes "
        "to resume from the last checkpoint"
    )
