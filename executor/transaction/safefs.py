"""Pinned-descriptor file operations on trees a job could write (upper dirs, session homes, repositories).

Owns the primitives every host-side walk uses: opening a directory path component by component with
``O_NOFOLLOW | O_DIRECTORY`` from a directory fd, ``lstat`` at a directory fd, and removing a tree
without following a link (``remove_tree``).

Must never: follow a symlink, or resolve a path a job could have changed by name from the filesystem
root once a descriptor for its parent is held.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_path(root_fd: int, parts: list[str]) -> int:
    """Open root/parts as a directory without following any symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd: int, name: str) -> None:
    """Remove whatever is at ``name`` (a whole tree for a dir) without following symlinks."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # shutil's fd-based rmtree re-checks each dir it enters against its lstat, so a dir
        # swapped for a symlink mid-walk is not followed (rmtree.avoids_symlink_attacks).
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it without following symlinks; missing is fine.

    For discarding upper/work dirs, which may hold whiteouts (char devices), fifos and dirs
    with mode 000 (overlay's work dir); as root none of that stops the removal.
    """
    path = Path(path)
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent_fd, path.name)
    finally:
        os.close(parent_fd)

