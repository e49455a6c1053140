"""Reading an overlayfs upper directory (``userxattr`` flavour) into a ``Change``.

Owns what a job's transaction says it did: metadata lives in ``user.overlay.*`` xattrs, whiteouts are
0/0 character devices (or zero-size files marked with the whiteout xattr), an opaque directory replaces
the one below. Entries come in apply order, parents before children; anything that must never reach a
repository (devices, fifos, sockets, renamed directories) is listed as refused, and anything under a
``.git`` directory as ignored.

Must never: follow a symlink (every directory is opened from its parent's fd with ``O_NOFOLLOW``), or
write to the upper dir.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import ReviewError, UnsafePath
from .safefs import DIR_FLAGS, open_dir_path

KINDS = ("file", "dir", "opaque_dir", "symlink", "delete")

OPAQUE_XATTR = "user.overlay.opaque"
WHITEOUT_XATTR = "user.overlay.whiteout"
# With these the upper entry does not hold its own content (redirected/renamed dir, metadata-only
# copy-up); applying it as-is would silently lose data, so it is refused. The volume is mounted
# with metacopy=off and without redirect_dir, so they should never appear.
UNSUPPORTED_XATTRS = ("user.overlay.redirect", "user.overlay.metacopy")


class Entry(NamedTuple):
    """One thing the job did, at ``path`` (relative, posix) of the repository."""

    path: str
    kind: str  # one of KINDS
    mode: int = 0  # permission bits as found in the upper dir (unsafe bits stripped on apply)
    size: int | None = None  # files only
    ino: int = 0  # files only: the upper inode (a commit that moves it checks it is still that one)


class Refused(NamedTuple):
    path: str
    reason: str


@dataclass
class Change:
    """What an upper dir would do to the repository, in apply order (parents before children)."""

    entries: list[Entry] = field(default_factory=list)
    #: paths at or below a ``.git`` directory: never applied, listed so the caller can say so
    ignored_git: list[str] = field(default_factory=list)
    #: entries that make the whole change unappliable (devices, fifos, sockets, ...)
    refused: list[Refused] = field(default_factory=list)

    @property
    def changed_files(self) -> list[str]:
        """Created, modified or deleted files and symlinks, plus deleted or replaced dirs."""
        return sorted(e.path for e in self.entries if e.kind != "dir")




def is_git_path(parts: list[str]) -> bool:
    # Git itself refuses any path with a ".git" component (verify_path), so nothing below one can
    # be repository content; writing there (hooks, config) would run code for the person.
    return ".git" in parts


def split_path(path: str) -> list[str]:
    """Split a relative posix path, refusing anything that could climb out of the repository."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path:
        raise UnsafePath(f"refusing path {path!r}: not a relative path", path=path)
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing path {path!r}: empty, '.' or '..' component", path=path)
    return parts




def _xattr(fd: int, name: str) -> bytes | None:
    # Always by fd (opened with O_NOFOLLOW): a path lookup here could be raced into a symlink.
    try:
        return os.getxattr(fd, name)
    except OSError:
        # ENODATA (absent) and ENOTSUP (fs without user xattrs) both mean "not set"
        return None


def _classify(dir_fd: int, name: str, st: os.stat_result) -> tuple[str | None, str | None]:
    """(kind, refusal reason) for one upper entry; dirs are classified when visited."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "symlink", None
    if stat.S_ISCHR(mode) and st.st_rdev == 0:
        return "delete", None
    if stat.S_ISREG(mode):
        # os.getxattr has no dir_fd: read the xattrs through an fd opened without following
        # symlinks, non-blocking in case the entry is swapped for a fifo under us.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            if st.st_size == 0 and _xattr(fd, WHITEOUT_XATTR) is not None:
                return "delete", None
            for x in UNSUPPORTED_XATTRS:
                if _xattr(fd, x) is not None:
                    return None, f"carries overlay xattr {x} (metacopy is not supported)"
        finally:
            os.close(fd)
        return "file", None
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return None, f"device file ({'char' if stat.S_ISCHR(mode) else 'block'} {dev})"
    if stat.S_ISFIFO(mode):
        return None, "named pipe (fifo)"
    if stat.S_ISSOCK(mode):
        return None, "socket"
    return None, f"unknown file type (mode {mode:o})"


def scan_upper(upper: Path) -> Change:
    """Walk ``upper`` (never following symlinks) and describe it as a ``Change``."""
    change = Change()
    root_fd = os.open(upper, DIR_FLAGS)
    try:
        # Explicit stack instead of recursion: a deep tree must not hit the recursion limit.
        # Popping a dir emits it, then its non-dir children, then pushes its subdirs, so every
        # parent comes before its children (pre-order), which is what apply needs.
        pending: list[list[str]] = [[]]
        while pending:
            parts = pending.pop()
            fd = open_dir_path(root_fd, parts)
            try:
                if parts:
                    _record_dir(change, fd, parts)
                subdirs = _scan_dir_children(change, fd, parts)
            finally:
                os.close(fd)
            pending.extend(parts + [name] for name in reversed(subdirs))
    finally:
        os.close(root_fd)
    return change


def _record_dir(change: Change, fd: int, parts: list[str]) -> None:
    path = "/".join(parts)
    st = os.fstat(fd)
    if is_git_path(parts):
        change.ignored_git.append(path)
        return
    for x in UNSUPPORTED_XATTRS:
        if _xattr(fd, x) is not None:
            change.refused.append(Refused(path, f"carries overlay xattr {x} (renamed directory)"))
            return
    kind = "opaque_dir" if _xattr(fd, OPAQUE_XATTR) == b"y" else "dir"
    change.entries.append(Entry(path, kind, stat.S_IMODE(st.st_mode)))


def _scan_dir_children(change: Change, fd: int, parts: list[str]) -> list[str]:
    """Record the non-dir children of one upper dir; return its subdir names, sorted."""
    subdirs = []
    for name in sorted(os.listdir(fd)):
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(name)
            continue
        child = parts + [name]
        path = "/".join(child)
        if is_git_path(child):
            change.ignored_git.append(path)
            continue
        kind, reason = _classify(fd, name, st)
        if reason is not None:
            change.refused.append(Refused(path, reason))
        elif kind == "file":
            change.entries.append(Entry(path, kind, stat.S_IMODE(st.st_mode), st.st_size, st.st_ino))
        elif kind == "symlink":
            change.entries.append(Entry(path, kind, stat.S_IMODE(st.st_mode)))
        else:
            change.entries.append(Entry(path, "delete"))
    return subdirs


#: The workspace root's storage marker (``intake/storage.py``): which storage a root is, by which hosts claim
#: jobs. A job whose workspace is a root itself must never write it (its root would become another storage).
STORAGE_MARKER = ".executor-storage"


def refuse_storage_marker(change: Change) -> None:
    """For a workspace that is a workspace root: its top-level storage marker is refused, never applied."""
    for entry in [e for e in change.entries if e.path == STORAGE_MARKER]:
        change.entries.remove(entry)
        change.refused.append(Refused(entry.path, "the workspace root's storage marker, which no job may change"))


def listed(paths: list[str], limit: int = 10) -> str:
    """Paths for a message: the first ``limit`` of them, and how many more."""
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def select(change: Change, paths: Iterable[str] | None) -> Change:
    """The part of ``change`` at ``paths`` (a changed path, or a directory: everything changed below it),
    with the parent directories it needs; a replaced parent directory not chosen itself is only made sure
    to exist (its old contents stay). ``None`` or empty: the whole change."""
    wanted = sorted({p.strip().strip("/") for p in paths or [] if p.strip().strip("/")})
    if not wanted:
        return change
    changed = [e for e in change.entries if e.kind != "dir"]

    def chosen(path: str) -> bool:
        return any(path == w or path.startswith(w + "/") for w in wanted)

    unknown = [w for w in wanted if not any(e.path == w or e.path.startswith(w + "/") for e in changed)]
    if unknown:
        raise ReviewError(f"not changed by the job: {', '.join(unknown)}; its changed paths are "
                          f"{listed([e.path for e in changed], 30)}", paths=unknown)
    picked = {e.path for e in changed if chosen(e.path)}
    parents = {"/".join(p.split("/")[:n]) for p in picked for n in range(1, p.count("/") + 1)}
    entries = []
    for e in change.entries:
        if e.path in picked:
            entries.append(e)
        elif e.path in parents:
            entries.append(e._replace(kind="dir") if e.kind == "opaque_dir" else e)
    return Change(entries=entries, ignored_git=change.ignored_git, refused=change.refused)
