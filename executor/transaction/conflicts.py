"""The conflict check before a commit: did the repository move under the job at the paths it touched?

Owns comparing the repository as it is now against the moment the job started (ctime against the start),
for the paths of a ``Change`` only (and the subtrees it deletes or replaces), so the cost follows the size
of the change, not of the repository.

Must never: write anything, or follow a symlink.
"""

from __future__ import annotations

import os
import stat

from .safefs import DIR_FLAGS, walk
from .upper import Change, Entry, is_git_path, split_path

# Kernels before multigrain timestamps stamp inodes from a coarse clock that can lag
# time.time_ns() by up to one tick (10 ms at HZ=100). Comparing against a slightly earlier
# instant keeps a change made just after the job started from slipping through; the price is
# that a change made in the few ms before the start is also reported, which is the safe side.
CLOCK_SLACK_NS = 20_000_000


def check_conflicts(change: Change, repo_fd: int, since_ns: int) -> list[str]:
    """Paths the job changed that also changed in the repository open at ``repo_fd`` after ``since_ns``;
    sorted.

    Only the paths in the change (and the repo subtrees the job deletes or replaces) are looked
    at, so the cost follows the size of the change, not of the repository.
    """
    limit = since_ns - CLOCK_SLACK_NS
    root_fd = os.dup(repo_fd)
    try:
        found = set()
        for entry in change.entries:
            # A plain dir in the upper is only the parent of something changed; its children are
            # checked themselves, and its own mtime moves whenever the person adds anything.
            if entry.kind == "dir" or is_git_path(entry.path.split("/")):
                continue
            if _entry_conflicts(root_fd, entry, limit):
                found.add(entry.path)
        return sorted(found)
    finally:
        os.close(root_fd)


def _entry_conflicts(root_fd: int, entry: Entry, limit: int) -> bool:
    parts = split_path(entry.path)
    fd = os.dup(root_fd)
    try:
        dir_st = os.fstat(fd)
        for depth, name in enumerate(parts):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                # Gone (or never there): only suspicious if the enclosing dir changed lately,
                # i.e. the person may have deleted or renamed what the job built on.
                return dir_st.st_mtime_ns > limit
            if depth == len(parts) - 1:
                return _leaf_conflicts(fd, name, st, entry.kind, limit)
            if not stat.S_ISDIR(st.st_mode):
                # Something other than a dir where the job saw one: recent means the person
                # replaced the dir; an old one (a symlink the job replaced) is the job's doing.
                return st.st_ctime_ns > limit
            try:
                nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError:
                return True  # swapped for a symlink/file between stat and open: changing now
            os.close(fd)
            fd, dir_st = nfd, st
        return False
    finally:
        os.close(fd)


def _leaf_conflicts(dir_fd: int, name: str, st: os.stat_result, kind: str, limit: int) -> bool:
    if st.st_ctime_ns > limit:
        return True
    if kind in ("opaque_dir", "delete") and stat.S_ISDIR(st.st_mode):
        # The job throws this whole subtree away: anything the person changed in it is lost.
        try:
            sub_fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return True
        try:
            return _subtree_changed(sub_fd, limit)
        finally:
            os.close(sub_fd)
    return False


def _subtree_changed(top_fd: int, limit: int) -> bool:
    """Whether any entry below the dir ``top_fd`` has a ctime after ``limit``."""
    try:
        return any(st.st_ctime_ns > limit for _fd, _name, st in walk(top_fd, strict=True))
    except OSError:
        return True  # vanished or swapped while we looked: it is changing right now
