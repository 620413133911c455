"""Progress bars for long work (training, metric sweeps, removal curves, recovery, the
demo's stages), drawn by `rich`; silent when stderr is not a terminal, under
`quiet()`, or with DEPTHJAX_QUIET=1, so logs and tests stay clean.

    for batch in track(batches, "ablation"):            # an iterable, with its length
        ...
    with bar("train", total=steps) as b:                 # manual, with live fields
        b.advance(loss=2.31, tok_s=3.1e3)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

_QUIET = [False]


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and nothing asked for quiet."""
    return not (_QUIET[0] or os.environ.get("DEPTHJAX_QUIET") or not sys.stderr.isatty())


@contextlib.contextmanager
def quiet(on: bool = True):
    """No progress bars inside this block (a command's --quiet)."""
    old, _QUIET[0] = _QUIET[0], on or _QUIET[0]
    try:
        yield
    finally:
        _QUIET[0] = old


class Bar:
    """One task of a rich Progress; `advance(n=1, **fields)` shows fields after the bar."""

    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields) -> None:
        if self._progress is not None:
            text = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, **({"fields": text} if fields else {}))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


@contextlib.contextmanager
def bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A progress bar with elapsed time, ETA and free-form fields (nothing when disabled)."""
    if not enabled():
        yield Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                  TextColumn("{task.fields[fields]}"), console=Console(stderr=True),
                  transient=False) as progress:
        yield Bar(progress, progress.add_task(description, total=total, fields=""))


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate `items` under a progress bar (total from len() when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
