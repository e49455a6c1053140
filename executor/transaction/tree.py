"""A read-only view of a directory tree a job or a person could change, through a pinned directory fd.

Owns reading by relative path beneath that fd: every component is opened with ``O_NOFOLLOW`` (a symlink
or a file where a directory should be means the path is not there), files are read non-blocking (a fifo
never hangs the reader) and up to a limit.

Must never: follow a symlink, write anything, or read above its root.
"""

from __future__ import annotations

import os
import stat

from .safefs import lstat_at, open_dir_path

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Tree:
    """Relative reads beneath ``fd`` (the caller keeps the fd open while the tree is used)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _parent(self, rel: str) -> tuple[int, str] | None:
        parts = rel.split("/")
        try:
            return open_dir_path(self.fd, parts[:-1]), parts[-1]
        except OSError:
            return None  # a symlink or file where a directory would be: not that path

    def lstat(self, rel: str) -> os.stat_result | None:
        found = self._parent(rel)
        if found is None:
            return None
        parent, name = found
        try:
            return lstat_at(parent, name)
        finally:
            os.close(parent)

    def readlink(self, rel: str) -> str:
        found = self._parent(rel)
        if found is None:
            raise FileNotFoundError(rel)
        parent, name = found
        try:
            return os.readlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    def _open(self, rel: str) -> int | None:
        found = self._parent(rel)
        if found is None:
            return None
        parent, name = found
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent)
        except OSError:
            return None
        finally:
            os.close(parent)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def read(self, rel: str, limit: int) -> bytes | None:
        """Up to ``limit`` bytes of the regular file at ``rel``; None when there is none."""
        fd = self._open(rel)
        if fd is None:
            return None
        try:
            chunks, size = [], 0
            while size < limit and (chunk := os.read(fd, min(1 << 20, limit - size))):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def count_lines(self, rel: str) -> int:
        fd = self._open(rel)
        if fd is None:
            return 0
        try:
            count, last = 0, b"\n"
            while chunk := os.read(fd, 1 << 20):
                count += chunk.count(b"\n")
                last = chunk[-1:]
            return count + (last != b"\n")
        finally:
            os.close(fd)

    def files_below(self, rel: str, limit: int) -> list[str]:
        """Relative paths of every non-directory entry below ``rel``, sorted per directory, at most ``limit``."""
        try:
            top = open_dir_path(self.fd, rel.split("/"))
        except OSError:
            return []
        found: list[str] = []
        pending = [(top, rel)]
        try:
            while pending and len(found) < limit:
                fd, prefix = pending.pop(0)
                try:
                    for name in sorted(os.listdir(fd)):
                        st = lstat_at(fd, name)
                        if st is None:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            try:
                                pending.append((open_dir_path(fd, [name]), f"{prefix}/{name}"))
                            except OSError:
                                continue
                        else:
                            found.append(f"{prefix}/{name}")
                finally:
                    os.close(fd)
        finally:
            for fd, _ in pending:
                os.close(fd)
        return found[:limit]
