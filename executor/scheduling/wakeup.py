"""What wakes the serving loop: a job file landing in the spool (inotify), a slot freed by a job thread, or the
poll interval passing (the fallback, and what keeps ``status.json`` fresh).

Owns an inotify watch on ``spool/incoming`` (``IN_MOVED_TO | IN_CLOSE_WRITE``: a writer renames its file
into it) and a self-pipe any thread can write to, both waited on with ``select`` and drained after. Where
inotify is missing the loop simply polls, as before.

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


class Wakeup:
    def __init__(self, watch: Path | None = None) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._inotify = _watch(watch) if watch is not None else None

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


def _watch(directory: Path) -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), _IN_MOVED_TO | _IN_CLOSE_WRITE) >= 0:
        return fd
    code = ctypes.get_errno()
    if fd >= 0:
        os.close(fd)
    log.warning("no inotify on the spool: polling it", extra={"action": "spool_poll", "error": os.strerror(code)})
    return None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
