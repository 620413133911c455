"""Who owns a run directory: `run.json` (what the run is) and `run.lock` (who writes it).

* run.json records the model config, program and training keys the run was started
  with. Rerunning into the same directory resumes only when the run is the same: a key
  that changes what the run *is* (the model's shape or math, its program, the data or
  its order, the trainable set) is refused with a message naming every differing key,
  because resuming would silently train something else or fail to restore. Keys that
  change only how it continues (steps, learning rate, ...) are accepted with a warning;
  bookkeeping keys (logging, checkpoint cadence, mesh, ...) silently.
* run.lock holds the writer's pid, host and start time; a second writer is refused. The
  holder refreshes its mtime every HEARTBEAT_S seconds, so a lock is stale when its pid
  is dead on this host, or when its heartbeat is older than STALE_AFTER_S (another
  host's process that died); a stale lock is taken over with a message.
* `move_aside` (`depthjax train --fresh`) moves a previous run to DIR.prev-TIMESTAMP so a
  new one can start at DIR: nothing is ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import DepthjaxError
from ..files.atomic import pid_alive

RECORD, LOCK = "run.json", "run.lock"
FORMAT = "depthjax-run"
HEARTBEAT_S, STALE_AFTER_S = 30, 300

# Training keys that define the run (its data, their order, the optimizer's structure).
IDENTITY_KEYS = {
    "init_from",
    "trainable",
    "batch_size",
    "seq_len",
    "seed",
    "seeds",
    "data",
    "data_files",
    "text_key",
    "tfds_name",
    "train_split",
    "tokenizer",
    "shuffle_window",
    "data_shards",
}
# Training keys that never change the numbers.
FREE_KEYS = {
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoint",
    "tensorboard",
    "eval_every",
    "eval_batches",
    "peak_tflops",
    "distributed",
    "heartbeat_timeout",
    "tfds_data_dir",
    "valid_split",
    "mesh",
}
# Model fields that choose how the same model executes.
EXECUTION_KEYS = {"dtype", "remat", "attention_impl", "attention_chunk"}


class RunDirError(DepthjaxError):
    """A run directory that cannot be used: another run's, in use, or not a directory."""


class RunInUse(RunDirError):
    """Another live process holds the run directory's lock."""


class DifferentRun(RunDirError):
    """The run directory holds a run that the given config would not continue."""


def describe(model_config: dict, program: dict, train_config: dict) -> dict:
    """The record of a run: its model, program and training keys (the preset name and
    model.FIELD overrides are represented by the model config they resolve to)."""
    train = {k: v for k, v in train_config.items() if k not in ("model", "model_overrides")}
    return {
        "format": FORMAT,
        "version": 1,
        "model": model_config,
        "program": program,
        "train": json.loads(json.dumps(train)),
    }


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def differences(
    stored: dict, now: dict, defaults: dict | None = None
) -> tuple[list[str], list[str]]:
    """(refused, warned): "key: old -> new" for the keys that differ, by kind. A training
    key the stored record lacks (added by a later depthjax) counts as unchanged when it
    now has its default (`defaults`, flat dotted keys) -- unless it is an identity key."""
    refused, warned = [], []
    old_prog, new_prog = stored.get("program") or {}, now.get("program") or {}
    if old_prog != new_prog:
        depths = [len(p.get("block", [])) for p in (old_prog, new_prog)]
        refused.append(
            f"program: depth {depths[0]} -> {depths[1]}"
            if depths[0] != depths[1]
            else f"program: {json.dumps(old_prog)} -> {json.dumps(new_prog)}"
        )
    for part, label in (("model", "model."), ("train", "")):
        old, new = flat(stored.get(part) or {}), flat(now.get(part) or {})
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
            top = key.split(".")[0]
            if a == b or (
                part == "train"
                and key not in old
                and top not in IDENTITY_KEYS
                and defaults is not None
                and defaults.get(key, a) == b
            ):
                continue
            text = f"{label}{key}: {a!r} -> {b!r}"
            if part == "model":
                (warned if key in EXECUTION_KEYS else refused).append(text)
            elif top in IDENTITY_KEYS or (key == "clip_norm" and 0 in (a, b)):
                refused.append(text)  # clipping on/off changes the optimizer state's tree
            elif top not in FREE_KEYS:
                warned.append(text)
    return refused, warned


def read_record(out_dir) -> dict | None:
    path = Path(out_dir) / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(
            f"{path} cannot be read ({e}); it says which run owns {out_dir}. "
            "Use another --out, or --fresh to move this run aside"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RunDirError(f"{path} is not a depthjax run record")
    return record


def write_record(out_dir, record: dict) -> None:
    path = Path(out_dir) / RECORD
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def refuse(out_dir, refused: list[str]) -> DifferentRun:
    return DifferentRun(
        f"{out_dir} holds a different run ({'; '.join(refused)}). Rerun with the same keys "
        f"to resume it, choose another --out, or pass --fresh to move it aside to "
        f"{Path(out_dir).name}.prev-TIMESTAMP and start a new run there"
    )


def move_aside(out_dir) -> Path | None:
    """Move every entry of out_dir except the lock into a new sibling DIR.prev-TIMESTAMP."""
    out_dir = Path(out_dir)
    entries = [e for e in out_dir.iterdir() if e.name != LOCK]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out_dir.with_name(f"{out_dir.name}.prev-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out_dir.with_name(f"{out_dir.name}.prev-{stamp}-{n}")
    aside.mkdir()
    for entry in entries:
        os.replace(entry, aside / entry.name)
    return aside


class RunLock:
    """run.lock in a run directory: acquire() or RunDirError naming the holder."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK
        self.me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv[1:],
        }
        self.took_over: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self):
        try:
            holder = json.loads(self.path.read_text())
            return holder, time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return {}, time.time() - self.path.stat().st_mtime

    def _stale(self, holder: dict, age: float) -> str | None:
        if (
            holder.get("host") == self.me["host"]
            and isinstance(holder.get("pid"), int)
            and not pid_alive(holder["pid"])
        ):
            return f"pid {holder['pid']} is no longer running"
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age:.0f}s"
        return None

    def acquire(self) -> RunLock:
        mine = self.path.with_name(f".{LOCK}.{self.me['host']}.{self.me['pid']}")
        mine.write_text(json.dumps(self.me) + "\n")
        try:
            for _ in range(5):
                try:
                    os.link(mine, self.path)  # atomic and exclusive, also on NFS
                    break
                except FileExistsError:
                    holder, age = self._read()
                    if holder is None:
                        continue  # released meanwhile: try again
                    why = self._stale(holder, age)
                    if why is None:
                        raise RunInUse(
                            f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                            f"{holder.get('host')} (since {holder.get('started')}); wait for "
                            f"it to finish or choose another --out (a lock whose process "
                            f"died goes stale after {STALE_AFTER_S}s without a heartbeat, at "
                            "once on the same host)"
                        ) from None
                    self._take_over(holder, why)
            else:
                raise RunInUse(f"cannot acquire {self.path}: it keeps changing hands")
        finally:
            mine.unlink(missing_ok=True)
        self._thread = threading.Thread(
            target=self._heartbeat, daemon=True, name="depthjax-run-lock"
        )
        self._thread.start()
        return self

    def _take_over(self, holder: dict, why: str) -> None:
        stale = self.path.with_name(f".{LOCK}.stale-{self.me['pid']}")
        try:
            os.replace(self.path, stale)
        except FileNotFoundError:
            return  # someone else took it over first
        try:
            moved = json.loads(stale.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != holder and moved:  # a live lock arrived in between: give it back
            os.replace(stale, self.path)
            return
        stale.unlink(missing_ok=True)
        self.took_over = (
            f"took over the stale lock of pid {holder.get('pid')} on {holder.get('host')} ({why})"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            # A missed touch (a network filesystem hiccup) must not kill the run: the next
            # tick retries, and a lock goes stale only after many missed ones.
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        holder, _ = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
