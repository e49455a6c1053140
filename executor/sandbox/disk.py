"""Disk as a governed resource: what a running job holds, measured while it runs.

Owns the meters the watchdog and the test runs consult, and the free space under the state root that the
governor keeps ``EXECUTOR_DISK_RESERVE`` of. Where the job's layers are a disk image of its policy's size
(``transaction/jobdisk.py``), the cap holds by construction (the writer gets ENOSPC) and ``FsMeter`` reads
the image's filesystem with one statvfs: cheap enough for every look, and it counts what a walk cannot see
(files deleted but held open, fallocate). The job is stopped (``disk_limit``) when its filesystem is full.
Where no image is possible, ``TreeMeter`` walks the layers from pinned fds without following links, every
few seconds and more rarely when a walk is costly: a job is stopped at its cap, having written at most what
it writes between two measurements (the container's tmpfs mounts are capped by their size either way).

Must never: follow a link the agent planted, write anything, or stop a job itself (the watchdog decides,
the runtime acts).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..transaction.loopmount import usage as fs_usage
from ..transaction.safefs import DIR_FLAGS, usage

#: Seconds between two walks at least; a walk taking longer than a tenth of this stretches it.
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
    """Measures a job's writable layers now and then; ``over`` says when they pass the limit. ``bytes``:
    the last figure; ``full``: what the job's own filesystem (an image) ran out of, ``space`` or ``inodes``
    ("" while it has both, and for a walk)."""

    full = ""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0

    def measure(self) -> int | None:
        """Measure when it is time (returns the bytes), else None."""
        raise NotImplementedError

    @property
    def over(self) -> bool:
        return self.bytes > self.limit


class TreeMeter(DiskMeter):
    """The layers walked every few seconds (the fallback where no disk image is possible)."""

    def __init__(self, paths: list[Path], limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(limit)
        self.paths, self.clock = paths, clock
        self._next = 0.0
        self._interval = MIN_INTERVAL

    def measure(self) -> int | None:
        now = self.clock()
        if now < self._next:
            return None
        started = time.monotonic()
        self.bytes = used(self.paths)
        cost = time.monotonic() - started
        self._interval = max(MIN_INTERVAL, 10 * cost)  # a big tree is measured less often, never more than 10 %
        self._next = now + self._interval
        return self.bytes


def full_margin(size: int) -> int:
    """Free bytes below which a job's filesystem counts as full: 1 % of it, between 4 and 64 MiB (what a
    writer stopped by ENOSPC leaves is less than a block group's worth)."""
    return min(64 * 2**20, max(4 * 2**20, size // 100))


#: Free inodes below which a job's filesystem counts as full (millions of empty files are a full disk too).
FULL_INODES = 256


class FsMeter(DiskMeter):
    """The job's own filesystem (its disk image) read with statvfs at every look."""

    def __init__(self, mount: Path, limit: int) -> None:
        super().__init__(limit)
        self.mount = mount
        self.free = 0

    def measure(self) -> int | None:
        try:
            found = fs_usage(self.mount)
        except OSError:
            return None  # the layers are being torn down
        self.bytes, self.free = found.used, found.free
        self.full = ("space" if found.free < full_margin(found.size) else
                     "inodes" if found.inodes_free < FULL_INODES else "")
        return self.bytes

    @property
    def over(self) -> bool:
        # Full, or (an image handed over from a job with a larger disk) past this job's own limit.
        return bool(self.full) or self.bytes > self.limit


def meter_for(layers: Path, limit: int) -> DiskMeter:
    """The meter of a job's layers: its image's filesystem where the layers are one, else a walk."""
    return FsMeter(layers, limit) if os.path.ismount(layers) else TreeMeter([layers], limit)
