"""Progress bars for long work (training, metric sweeps, removal curves, recovery, the
demo's stages), drawn by `rich` on stderr; silent when stderr is not a terminal, under
`quiet()` (a command's --quiet), or with DEPTHJAX_QUIET=1, so logs and tests stay clean.

    for batch in track(batches, "ablation"):            # an iterable, with its length
        ...
    with bar("train", total=steps) as b:                 # manual, with live fields
        b.advance(loss=2.31, tok_s=3.1e3)
        b.print("resumed from checkpoint 40")            # a line above the bar

Bars nest: an inner `track` inside an outer `bar` draws as a second row of the same
display, and disappears when done (only the outermost bar stays on screen).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

_QUIET = [False]
_LIVE: list = []  # the rich Progress of the outermost open bar, if one is drawing


def silenced() -> bool:
    """Whether quiet was asked for (`quiet()` or DEPTHJAX_QUIET), terminal or not."""
    return _QUIET[0] or bool(os.environ.get("DEPTHJAX_QUIET"))


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and nothing asked for quiet."""
    return not silenced() and sys.stderr.isatty()


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

    @property
    def drawing(self) -> bool:
        return self._progress is not None

    def advance(self, n: float = 1, **fields) -> None:
        if self._progress is not None:
            text = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, **({"fields": text} if fields else {}))

    def print(self, text: str) -> None:
        """A line above the bar (on stderr when no bar is drawing)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def _columns():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[fields]}"),
    )


@contextlib.contextmanager
def bar(description: str, total: int | None = None, completed: int = 0) -> Iterator[Bar]:
    """A progress bar with elapsed time, ETA and free-form fields (nothing when disabled);
    `completed` starts it part-way (a resumed run)."""
    if not enabled():
        yield Bar(None, None)
        return
    if _LIVE:  # nested: a row of the outer display, removed when done
        progress = _LIVE[-1]
        task = progress.add_task(description, total=total, completed=completed, fields="")
        try:
            yield Bar(progress, task)
        finally:
            progress.remove_task(task)
        return
    from rich.console import Console
    from rich.progress import Progress

    # Prints to stdout go above the bar only when stdout is the same terminal; redirected
    # to a file, they must reach the file.
    with Progress(
        *_columns(),
        console=Console(stderr=True),
        transient=False,
        redirect_stdout=sys.stdout.isatty(),
    ) as progress:
        _LIVE.append(progress)
        try:
            yield Bar(
                progress,
                progress.add_task(description, total=total, completed=completed, fields=""),
            )
        finally:
            _LIVE.pop()


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Iterate `items` under a progress bar (total from len() when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
