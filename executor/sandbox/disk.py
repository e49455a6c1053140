"""Disk as a governed resource: what a running job has written, measured while it runs.

Owns ``DiskMeter``: the bytes a job's writable layers use (its workspace upper dir and its home layer,
walked from pinned fds without following links; the container's tmpfs mounts are capped by their size
instead), measured every few seconds and more rarely when a measurement is costly, and the free space
under the state root that the governor keeps ``EXECUTOR_DISK_RESERVE`` of. On this engine and filesystem
(no project quotas, no size-limited volume driver) that measurement is the strongest enforcement there is:
a job is stopped at its cap, having written at most what it writes between two measurements.

Must never: follow a link the agent planted, write anything, or stop a job itself (the watchdog decides,
the runtime acts).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..transaction.safefs import DIR_FLAGS, usage

#: Seconds between two measurements at least; a measurement taking longer than a tenth of this stretches it.
MIN_INTERVAL = 2.0


def used(paths: list[Path]) -> int:
    """Bytes used under ``paths`` together (pinned fds, never following a link); a missing path counts 0."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, DIR_FLAGS)
        except OSError:
            continue
        try:
            total += usage(fd) + os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
    return total


def free_bytes(path: Path) -> int:
    """Free space for the executor under ``path`` (the state root's filesystem)."""
    return shutil.disk_usage(path).free


class DiskMeter:
    """Measures a job's writable layers now and then; ``over`` says when they pass the limit."""

    def __init__(self, paths: list[Path], limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.paths, self.limit, self.clock = paths, limit, clock
        self.bytes = 0
        self._next = 0.0
        self._interval = MIN_INTERVAL

    def measure(self) -> int | None:
        """Measure when it is time (returns the bytes), else None."""
        now = self.clock()
        if now < self._next:
            return None
        started = time.monotonic()
        self.bytes = used(self.paths)
        cost = time.monotonic() - started
        self._interval = max(MIN_INTERVAL, 10 * cost)  # a big tree is measured less often, never more than 10 %
        self._next = now + self._interval
        return self.bytes

    @property
    def over(self) -> bool:
        return self.bytes > self.limit
