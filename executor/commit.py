"""Applying a job's overlay upper directory onto the repository, and the conflict check before it.

Owns: reading an overlayfs upper dir (``userxattr`` flavour: metadata in ``user.overlay.*``
xattrs, whiteouts as 0/0 character devices) into a ``Change``; deciding whether the repository
moved under the job at the paths the job touched (``check_conflicts``); and writing the change
into the repository (``apply_change``), file by file atomically and idempotently, so a crash
mid-commit is repaired by running the commit again. ``remove_tree`` discards an upper dir.

Must never: follow a symlink out of the repository (every path is walked component by component
with directory fds and ``O_NOFOLLOW``), create a device file, fifo or socket, keep
setuid/setgid/sticky bits, write through an existing hard link or symlink, or touch anything
under a ``.git`` directory. A change holding something unsafe is refused whole (``UnsafePath``):
a partial commit would not be what the tests ran against.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from executor.errors import UnsafePath, WorkspaceError

__all__ = [
    "Entry",
    "Refused",
    "Change",
    "scan_upper",
    "check_conflicts",
    "apply_change",
    "remove_tree",
    "CLOCK_SLACK_NS",
]

KINDS = ("file", "dir", "opaque_dir", "symlink", "delete")

OPAQUE_XATTR = "user.overlay.opaque"
WHITEOUT_XATTR = "user.overlay.whiteout"
# With these the upper entry does not hold its own content (redirected/renamed dir, metadata-only
# copy-up); applying it as-is would silently lose data, so it is refused. The volume is mounted
# with metacopy=off and without redirect_dir, so they should never appear.
UNSUPPORTED_XATTRS = ("user.overlay.redirect", "user.overlay.metacopy")

# Kernels before multigrain timestamps stamp inodes from a coarse clock that can lag
# time.time_ns() by up to one tick (10 ms at HZ=100). Comparing against a slightly earlier
# instant keeps a change made just after the job started from slipping through; the price is
# that a change made in the few ms before the start is also reported, which is the safe side.
CLOCK_SLACK_NS = 20_000_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 20


class Entry(NamedTuple):
    """One thing the job did, at ``path`` (relative, posix) of the repository."""

    path: str
    kind: str  # one of KINDS
    mode: int = 0  # permission bits as found in the upper dir (unsafe bits stripped on apply)
    size: int | None = None  # files only


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


# --------------------------------------------------------------------------------------------
# paths


def _is_git_path(parts: list[str]) -> bool:
    # Git itself refuses any path with a ".git" component (verify_path), so nothing below one can
    # be repository content; writing there (hooks, config) would run code for the person.
    return ".git" in parts


def _split(path: str) -> list[str]:
    """Split a relative posix path, refusing anything that could climb out of the repository."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\0" in path:
        raise UnsafePath(f"refusing path {path!r}: not a relative path", path=path)
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing path {path!r}: empty, '.' or '..' component", path=path)
    return parts


# --------------------------------------------------------------------------------------------
# scan


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


def _open_dir_path(root_fd: int, parts: list[str]) -> int:
    """Open root/parts as a directory without following any symlink on the way."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def scan_upper(upper: Path) -> Change:
    """Walk ``upper`` (never following symlinks) and describe it as a ``Change``."""
    change = Change()
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Explicit stack instead of recursion: a deep tree must not hit the recursion limit.
        # Popping a dir emits it, then its non-dir children, then pushes its subdirs, so every
        # parent comes before its children (pre-order), which is what apply needs.
        pending: list[list[str]] = [[]]
        while pending:
            parts = pending.pop()
            fd = _open_dir_path(root_fd, parts)
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
    if _is_git_path(parts):
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
        if _is_git_path(child):
            change.ignored_git.append(path)
            continue
        kind, reason = _classify(fd, name, st)
        if reason is not None:
            change.refused.append(Refused(path, reason))
        elif kind == "file":
            change.entries.append(Entry(path, kind, stat.S_IMODE(st.st_mode), st.st_size))
        elif kind == "symlink":
            change.entries.append(Entry(path, kind, stat.S_IMODE(st.st_mode)))
        else:
            change.entries.append(Entry(path, "delete"))
    return subdirs


# --------------------------------------------------------------------------------------------
# conflicts


def check_conflicts(change: Change, repo: Path, since_ns: int) -> list[str]:
    """Paths the job changed that also changed in ``repo`` after ``since_ns``; sorted.

    Only the paths in the change (and the repo subtrees the job deletes or replaces) are looked
    at, so the cost follows the size of the change, not of the repository.
    """
    limit = since_ns - CLOCK_SLACK_NS
    root_fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        found = set()
        for entry in change.entries:
            # A plain dir in the upper is only the parent of something changed; its children are
            # checked themselves, and its own mtime moves whenever the person adds anything.
            if entry.kind == "dir" or _is_git_path(entry.path.split("/")):
                continue
            if _entry_conflicts(root_fd, entry, limit):
                found.add(entry.path)
        return sorted(found)
    finally:
        os.close(root_fd)


def _entry_conflicts(root_fd: int, entry: Entry, limit: int) -> bool:
    parts = _split(entry.path)
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
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
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
            sub_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return True
        try:
            return _subtree_changed(sub_fd, limit)
        finally:
            os.close(sub_fd)
    return False


def _subtree_changed(top_fd: int, limit: int) -> bool:
    """Whether any entry below the dir ``top_fd`` has a ctime after ``limit``."""
    stack = [os.dup(top_fd)]
    try:
        while stack:
            fd = stack.pop()
            try:
                for name in os.listdir(fd):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if st.st_ctime_ns > limit:
                        return True
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(os.open(name, _DIR_FLAGS, dir_fd=fd))
            except OSError:
                return True  # vanished or swapped while we looked: it is changing right now
            finally:
                os.close(fd)
        return False
    finally:
        for fd in stack:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# apply


def apply_change(change: Change, upper: Path, repo: Path, uid: int, gid: int) -> None:
    """Write ``change`` (read from ``upper``) into ``repo``, files owned by ``uid``:``gid``.

    Idempotent: every step makes the repo entry equal to the upper's whatever it was before,
    so running it again after a crash finishes the job and a second full run changes nothing.
    """
    if change.refused:
        listed = "; ".join(f"{r.path}: {r.reason}" for r in change.refused[:20])
        more = " ..." if len(change.refused) > 20 else ""
        raise UnsafePath(
            f"refusing to apply the job's changes: {len(change.refused)} path(s) must never be "
            f"written to the repository ({listed}{more}); nothing was applied",
            paths=[r.path for r in change.refused],
        )
    # Validate every path before writing anything, so a bad entry cannot leave half a commit.
    plan = [(e, _split(e.path)) for e in change.entries if not _is_git_path(e.path.split("/"))]
    for entry, _ in plan:
        if entry.kind not in KINDS:
            raise UnsafePath(f"refusing entry {entry.path!r}: unknown kind {entry.kind!r}")
    walker = _Walker(upper, repo, uid, gid)
    try:
        for entry, parts in plan:
            walker.enter(parts[:-1])
            _apply_entry(walker.top, entry, parts[-1], uid, gid)
    finally:
        walker.close()


@dataclass
class _Frame:
    """One directory level open on both sides: the upper dir (read) and the repo dir (written)."""

    name: str
    upper_fd: int
    repo_fd: int


class _Walker:
    """Keeps the dirs of the current entry's parent open, on both sides, as a stack of fds.

    Entries come parents-first, so consecutive entries share most of their path: each step
    closes only the levels it leaves and opens only the ones it enters, and the number of open
    fds stays bounded by the depth of the tree, not its size.
    """

    def __init__(self, upper: Path, repo: Path, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.stack: list[_Frame] = []
        upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            repo_fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(upper_fd)
            raise
        self.stack.append(_Frame("", upper_fd, repo_fd))

    @property
    def top(self) -> _Frame:
        return self.stack[-1]

    def enter(self, parts: list[str]) -> None:
        common = 0
        for frame, name in zip(self.stack[1:], parts):
            if frame.name != name:
                break
            common += 1
        while len(self.stack) > common + 1:
            _close_frame(self.stack.pop())
        for name in parts[common:]:
            upper_fd = _open_upper_dir(self.top.upper_fd, name)
            try:
                repo_fd = _open_repo_dir(self.top.repo_fd, name, self.uid, self.gid)
            except BaseException:
                os.close(upper_fd)
                raise
            self.stack.append(_Frame(name, upper_fd, repo_fd))

    def close(self) -> None:
        while self.stack:
            _close_frame(self.stack.pop())


def _close_frame(frame: _Frame) -> None:
    try:
        # Make the renames and unlinks in this dir durable before the job is marked committed.
        os.fsync(frame.repo_fd)
    finally:
        os.close(frame.repo_fd)
        os.close(frame.upper_fd)


def _open_upper_dir(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise UnsafePath(
            f"upper dir changed since it was scanned: {name!r} is no longer a directory ({exc})"
        ) from exc


def _open_repo_dir(parent_fd: int, name: str, uid: int, gid: int) -> int:
    """Open a repo dir, never following a symlink; replace a non-dir with a fresh dir.

    Only reached for a parent whose own entry was already applied, so the fresh-dir case
    exists for hand-built changes; it gets ordinary permissions.
    """
    st = _lstat_at(parent_fd, name)
    if st is None or not stat.S_ISDIR(st.st_mode):
        _ensure_dir(parent_fd, name, 0o755, uid, gid)
    # An existing dir keeps the mode its own entry gave it; O_NOFOLLOW catches a late swap.
    return _open_dir_nofollow(parent_fd, name)


def _open_dir_nofollow(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        # ELOOP/ENOTDIR: someone swapped it for a symlink or file after we made it a dir.
        raise WorkspaceError(
            f"repository entry {name!r} changed while the job's changes were being applied "
            f"({exc}); run the commit again",
        ) from exc


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove whatever is at ``name`` (a whole tree for a dir) without following symlinks."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # shutil's fd-based rmtree re-checks each dir it enters against its lstat, so a dir
        # swapped for a symlink mid-walk is not followed (rmtree.avoids_symlink_attacks).
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _clear_dir(fd: int) -> None:
    for name in os.listdir(fd):
        _remove_at(fd, name)


def _dir_mode(mode: int) -> int:
    return stat.S_IMODE(mode) & 0o777  # no setuid/setgid/sticky


def _file_mode(mode: int) -> int:
    return stat.S_IMODE(mode) & 0o777


def _ensure_dir(parent_fd: int, name: str, mode: int, uid: int, gid: int) -> None:
    st = _lstat_at(parent_fd, name)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)  # a file or symlink where the upper has a dir
        st = None
    if st is None:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    fd = _open_dir_nofollow(parent_fd, name)
    try:
        # chown before chmod: chown may clear mode bits, and the mode must be the final word.
        # fchmod also drops the setgid bit mkdir inherits from a setgid parent.
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _apply_entry(frame: _Frame, entry: Entry, name: str, uid: int, gid: int) -> None:
    if entry.kind == "dir":
        _ensure_dir(frame.repo_fd, name, _dir_mode(entry.mode), uid, gid)
    elif entry.kind == "opaque_dir":
        _apply_opaque_dir(frame.repo_fd, name, _dir_mode(entry.mode), uid, gid)
    elif entry.kind == "delete":
        _remove_at(frame.repo_fd, name)
    elif entry.kind == "file":
        _apply_file(frame, name, _file_mode(entry.mode), uid, gid)
    elif entry.kind == "symlink":
        _apply_symlink(frame, name, uid, gid)


def _apply_opaque_dir(parent_fd: int, name: str, mode: int, uid: int, gid: int) -> None:
    """The job removed the dir and made a new one: nothing of the old contents survives."""
    st = _lstat_at(parent_fd, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        # Empty it in place rather than rmtree+mkdir: same result, and an interrupted run
        # leaves a dir that the next run empties again.
        fd = _open_dir_nofollow(parent_fd, name)
        try:
            _clear_dir(fd)
        finally:
            os.close(fd)
    _ensure_dir(parent_fd, name, mode, uid, gid)


def _temp_name(name: str) -> str:
    # Deterministic, so a temp left by a crashed commit is reused (removed) by the next run;
    # hashed, so it fits NAME_MAX whatever the target's length.
    return ".commit-tmp-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _make_temp(dir_fd: int, name: str, mode: int) -> tuple[str, int]:
    tmp = _temp_name(name)
    _remove_at(dir_fd, tmp)
    # O_EXCL|O_NOFOLLOW: we only ever write into an inode we have just created ourselves,
    # never through a symlink or into an existing (possibly hard-linked) file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return tmp, os.open(tmp, flags, mode, dir_fd=dir_fd)


def _replace(dir_fd: int, tmp: str, name: str) -> None:
    """Put ``tmp`` in place of ``name`` in one step (rename cannot replace a dir by a file)."""
    st = _lstat_at(dir_fd, name)
    if st is not None and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _apply_file(frame: _Frame, name: str, mode: int, uid: int, gid: int) -> None:
    # O_NONBLOCK: if the upper entry became a fifo since the scan, open must not hang.
    src_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        src = os.open(name, src_flags, dir_fd=frame.upper_fd)
    except OSError as exc:
        raise UnsafePath(f"upper file {name!r} changed since it was scanned ({exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise UnsafePath(f"upper entry {name!r} is no longer a regular file")
        tmp, dst = _make_temp(frame.repo_fd, name, 0o600)
        try:
            _copy_fd(src, dst)
            os.fchown(dst, uid, gid)
            os.fchmod(dst, mode)
            os.fsync(dst)  # content on disk before the rename makes it visible
        except BaseException:
            os.close(dst)
            _remove_at(frame.repo_fd, tmp)
            raise
        os.close(dst)
    finally:
        os.close(src)
    _replace(frame.repo_fd, tmp, name)


def _copy_fd(src: int, dst: int) -> None:
    # Plain read/write: works across filesystems and for every file the scan accepted. A file
    # with several hard links in the upper simply lands as independent copies.
    while True:
        chunk = os.read(src, _COPY_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def _apply_symlink(frame: _Frame, name: str, uid: int, gid: int) -> None:
    try:
        target = os.readlink(name, dir_fd=frame.upper_fd)
    except OSError as exc:
        raise UnsafePath(f"upper entry {name!r} is no longer a symlink ({exc})") from exc
    # The target string is copied verbatim, even if absolute or pointing outside: the link
    # itself lives in the repo, and nothing here ever writes through a link.
    tmp = _temp_name(name)
    _remove_at(frame.repo_fd, tmp)
    os.symlink(target, tmp, dir_fd=frame.repo_fd)
    try:
        os.chown(tmp, uid, gid, dir_fd=frame.repo_fd, follow_symlinks=False)
    except BaseException:
        _remove_at(frame.repo_fd, tmp)
        raise
    _replace(frame.repo_fd, tmp, name)


# --------------------------------------------------------------------------------------------
# discard


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it without following symlinks; missing is fine.

    For discarding upper/work dirs, which may hold whiteouts (char devices), fifos and dirs
    with mode 000 (overlay's work dir); as root none of that stops the removal.
    """
    path = Path(path)
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_at(parent_fd, path.name)
    finally:
        os.close(parent_fd)
