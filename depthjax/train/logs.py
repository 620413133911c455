"""Training logs: metrics.jsonl, TensorBoard event files, a progress line on a terminal.

TensorBoard's event format is TFRecord framing around `Event` protocol buffers. None of
the allowed dependencies writes it without TensorFlow (flax.metrics.tensorboard imports
TensorFlow), so `EventWriter` encodes the few fields it needs by hand: scalars only.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path


# -- TFRecord + Event encoding -------------------------------------------------------------
def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord frames use."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def encode_event(wall_time: float, step: int, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
    """An `Event` message: wall_time=1 (double), step=2 (int64), file_version=3,
    summary=5 { value=1 { tag=1, simple_value=2 (float) } }."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) +
                                 _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        msg += _field(5, 2, values)
    return msg


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data +
            struct.pack("<I", _masked_crc(data)))


class EventWriter:
    """Appends scalar summaries to a TensorBoard event file in `logdir`."""

    def __init__(self, logdir):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._f = open(self.path, "ab")
        self._f.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict) -> None:
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._f.write(tfrecord(encode_event(time.time(), step, values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# -- the run log ---------------------------------------------------------------------------
class RunLog:
    """metrics.jsonl (one JSON object per logged step), TensorBoard, and progress output:
    a self-overwriting line on a terminal, otherwise one plain line per log step."""

    def __init__(self, out_dir, total_steps: int, *, tensorboard: bool = True,
                 enabled: bool = True, stream=None):
        self.enabled, self.total = enabled, total_steps
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._jsonl = open(Path(out_dir) / "metrics.jsonl", "a") if enabled else None
        self._tb = EventWriter(Path(out_dir) / "tensorboard") if enabled and tensorboard else None
        self._t0 = time.time()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/inf: a non-finite value is written as null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        if self._tb:
            self._tb.scalars(record["step"], {k: v for k, v in clean.items() if k != "step"})
        self._progress(clean)

    def _progress(self, r: dict) -> None:
        step, frac = r["step"], r["step"] / max(self.total, 1)
        elapsed = time.time() - self._t0
        loss = "nan" if r["loss"] is None else f"{r['loss']:.4f}"
        parts = [f"step {step}/{self.total}", f"loss {loss}"]
        if r.get("tokens_per_s"):
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if "eval_loss" in r:
            parts.append(f"eval {r['eval_loss']:.4f}")
        if self.tty:
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            eta = elapsed / max(frac, 1e-9) - elapsed if frac > 0 else 0
            self.stream.write(f"\r[{bar}] " + "  ".join(parts) + f"  eta {eta:.0f}s \x1b[K")
            if step >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write("[train] " + "  ".join(parts) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + f"[train] {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
