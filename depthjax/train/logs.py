"""Training logs: metrics.jsonl, TensorBoard event files (tensorboardX) and the console.

A resumed run's logs read as if it had never stopped. metrics.jsonl is the record (one
flushed line per logged step); `RunLog.start(step)` cuts the lines after the restored
checkpoint's step (written beside, then swapped in). TensorBoard is derived from it: a
resumed run opens a new event file with `purge_step=1`, which tells TensorBoard to drop
every event of the earlier files, and writes the kept records into it again before
going on, so events that an earlier attempt wrote after the checkpoint, or lost in
tensorboardX's write queue when it was killed, cannot show. On a terminal the console
shows a progress bar (step, loss, tokens/s, ETA); otherwise one plain line per logged
step (none under quiet).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from .. import progress


def cut_jsonl(path, step: int) -> list[dict]:
    """Keep the records of steps <= `step` (dropping a line torn by a kill mid-write),
    atomically; returns them."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    keep, records = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and record.get("step", 0) <= step:
            keep.append(line)
            records.append(record)
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return records


class RunLog:
    """metrics.jsonl (one JSON object per logged step), TensorBoard, and console output.

    Messages may be written before `start`; records only after it."""

    def __init__(
        self,
        out_dir,
        total_steps: int,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        stream=None,
    ):
        self.out_dir, self.total = Path(out_dir), total_steps
        self.enabled, self.tensorboard = enabled, tensorboard
        self.stream = stream or sys.stderr
        self._jsonl = self._tb = self._bar = None
        self._stack = contextlib.ExitStack()

    def start(self, step: int) -> None:
        """Open the logs for a run continuing after `step` (0: from the beginning)."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.out_dir / "metrics.jsonl"
        kept = cut_jsonl(jsonl, step)
        self._jsonl = open(jsonl, "a")
        if self.tensorboard:
            from tensorboardX import SummaryWriter

            logdir = self.out_dir / "tensorboard"
            earlier = logdir.is_dir() and any(logdir.glob("events.out.tfevents.*"))
            # The pid keeps two files of one host apart even within the same second.
            self._tb = SummaryWriter(
                str(logdir),
                purge_step=1 if earlier or kept else None,
                flush_secs=10,
                filename_suffix=f".{os.getpid()}",
            )
            for record in kept:
                self._scalars(record)
        self._bar = self._stack.enter_context(progress.bar("train", self.total, completed=step))
        self._shown = step

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/inf: a non-finite value is written as null.
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        if self._tb:
            self._scalars(clean)
        self._console(clean)

    def _scalars(self, record: dict) -> None:
        for tag, value in record.items():
            if (
                tag not in ("step", "time")
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                self._tb.add_scalar(tag, float(value), record["step"], walltime=record.get("time"))

    def _console(self, r: dict) -> None:
        loss = "nan" if r["loss"] is None else f"{r['loss']:.4f}"
        fields = {"loss": loss}
        if r.get("tokens_per_s"):
            fields["tok/s"] = f"{r['tokens_per_s']:,.0f}"
        if r.get("mfu") is not None:
            fields["mfu"] = f"{100 * r['mfu']:.1f}%"
        if "eval_loss" in r:
            fields["eval"] = f"{r['eval_loss']:.4f}"
        if self._bar.drawing:
            self._bar.advance(r["step"] - self._shown, **fields)
            self._shown = r["step"]
        elif not progress.silenced():
            self.stream.write(
                f"[train] step {r['step']}/{self.total}  "
                + "  ".join(f"{k} {v}" for k, v in fields.items())
                + "\n"
            )
            self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and self._bar.drawing:
            self._bar.print(f"[train] {text}")
        else:
            self.stream.write(f"[train] {text}\n")
            self.stream.flush()

    def close(self) -> None:
        self._stack.close()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
