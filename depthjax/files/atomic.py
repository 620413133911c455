"""Write beside, then swap: replacing a directory so that a reader, or a kill at any
moment, sees the old version or the new one -- never a mix, never nothing.

    with replacing(path, carry=lambda name: name == "README.md") as tmp:
        ...write the new files into tmp...
    # path now holds them (plus the carried entries of the old directory)

The staging directory `.NAME.tmp-HOST-PID-XXXX` sits beside `path`. On success every file
in it is fsynced, entries of the old directory that `carry` selects are hard-linked (or
copied) in, and it is exchanged with `path` in one `renameat2(RENAME_EXCHANGE)` where the
kernel and filesystem allow it, else in two renames (the old one first moved to
`.NAME.old-HOST-PID-XXXX`). Only then is the old directory removed. Leftovers of a killed
process on this host are removed -- or, for an old directory whose replacement never
arrived, moved back into place -- the next time the same path is replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (and `root` itself)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def start_writeback(fd: int) -> None:
    """Start writing file `fd`'s dirty pages to disk without waiting (Linux
    sync_file_range(SYNC_FILE_RANGE_WRITE)), so the fsync that must follow finds the work
    mostly done; a no-op where the call is unavailable. Not a durability promise."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, 2)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where that is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def clean_stale(path: Path, *, any_owner: bool = False) -> None:
    """Remove staging leftovers of dead processes of this host beside `path`; an old
    directory left between the two renames of a swap is moved back if `path` is gone.

    any_owner=True (the caller knows nobody else writes `path`, e.g. it holds a run's
    lock): leftovers of any host or process count as dead, including those of older
    depthjax versions (`.NAME.tmp-XXXXXXXX`)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    host = r"[^/]*" if any_owner else re.escape(socket.gethostname())
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(?:{host}-(\d+)-)?.*")
    for entry in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or not (any_owner or (m.group(2) and not pid_alive(int(m.group(2))))):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(entry, path)  # the swap died half-way: the old one is the only copy
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_in(new: Path, path: Path) -> None:
    """Put directory `new` at `path`, replacing what is there only once `new` is in place."""
    if not path.exists():
        os.replace(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old directory
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{_tag()}-", dir=path.parent))
        os.replace(path, old)  # onto the empty directory that reserved the name
        os.replace(new, path)
        shutil.rmtree(old)
    fsync_dir(path.parent)


@contextlib.contextmanager
def replacing(path, *, carry: Callable[[str], bool] = lambda name: False):
    """Yield a staging directory beside `path`; on normal exit it replaces `path` (see the
    module docstring). Entries of an existing `path` selected by `carry(name)` and not
    written anew are kept. On an exception `path` is untouched and the staging removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_tag()}-", dir=path.parent))
    # mkdtemp makes a private (0700) directory; give it the old one's mode, or the umask's
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_dir() else 0o777 & ~umask)
    try:
        yield tmp
        if path.is_dir():
            for entry in path.iterdir():
                if carry(entry.name) and not (tmp / entry.name).exists():
                    _link_or_copy(entry, tmp / entry.name)
        fsync_tree(tmp)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
