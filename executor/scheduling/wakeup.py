"""What wakes the serving loop: a job file landing in the spool (inotify), new work committed to a SQLite store
(its wake file, inotify), a slot freed by a job thread or a NOTIFY (the pipe), or the wait passing (the
fallback, and what keeps ``status.json`` fresh).

Owns an inotify watch on ``spool/incoming`` (``IN_MOVED_TO | IN_CLOSE_WRITE``: a writer renames its file
into it), one on the SQLite store's wake file (``IN_CLOSE_WRITE``: ``Store`` opens and closes it after each
commit that brings new work, from any process), and a self-pipe any thread can write to, all waited on with
``select`` and drained after. ``watching`` says what is watched: whatever is not, the loop polls for, as
before.

Must never: lose a wake-up (the pipe and the inotify fd are level-triggered: an event before the wait is
seen by it), or block a writer (the pipe is non-blocking; a full pipe already means "wake up").
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
from pathlib import Path

log = logging.getLogger(__name__)

_IN_CLOSE_WRITE, _IN_MOVED_TO = 0x00000008, 0x00000080
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_IN_DONT_FOLLOW = 0x02000000
_libc = ctypes.CDLL(None, use_errno=True)


class Wakeup:
    def __init__(self, watch: Path | None = None, store_file: Path | None = None) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._inotify = _inotify()
        #: what a change of wakes the loop: "spool" (job files), "store" (new work in a SQLite store)
        self.watching: set[str] = set()
        if self._inotify is None:
            return
        if watch is not None and _add(self._inotify, watch, _IN_MOVED_TO | _IN_CLOSE_WRITE):
            self.watching.add("spool")
        if store_file is not None and _watch_file(self._inotify, store_file):
            self.watching.add("store")

    def wake(self) -> None:
        """Wake the loop now (from any thread)."""
        try:
            os.write(self._write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    def wait(self, timeout: float) -> bool:
        """Wait until something happens or ``timeout`` passes; True when woken before the timeout."""
        fds = [self._read] + ([self._inotify] if self._inotify is not None else [])
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            _drain(fd)
        return bool(ready)

    def close(self) -> None:
        for fd in (self._read, self._write, self._inotify):
            if fd is not None:
                os.close(fd)


def _inotify() -> int | None:
    fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        log.warning("no inotify: polling the spool and the store", extra={
            "action": "spool_poll", "error": os.strerror(ctypes.get_errno())})
        return None
    return fd


def _add(fd: int, path: Path, mask: int) -> bool:
    if _libc.inotify_add_watch(fd, os.fsencode(path), mask | _IN_DONT_FOLLOW) >= 0:
        return True
    log.warning("cannot watch a path: polling it", extra={"action": "spool_poll", "path": str(path),
                                                          "error": os.strerror(ctypes.get_errno())})
    return False


def _watch_file(fd: int, path: Path) -> bool:
    """Watch the store's wake file (made here when missing, as a regular file: never through a link)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        log.warning("cannot make the store's wake file: polling the store", extra={
            "action": "spool_poll", "error": exc.strerror})
        return False
    return _add(fd, path, _IN_CLOSE_WRITE)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
