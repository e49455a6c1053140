"""Writing a job's ``Change`` (read from its upper dir) into the repository.

Owns ``apply_change``: file by file atomically and idempotently, so a crash mid-commit is repaired by
running it again. Every path is walked component by component with directory fds and ``O_NOFOLLOW`` on
both sides.

Must never: follow a symlink out of the repository, create a device file, fifo or socket, keep
setuid/setgid/sticky bits, write through an existing hard link or symlink, or touch anything under a
``.git`` directory. A change holding something unsafe is refused whole (``UnsafePath``): a partial commit
would not be what the tests ran against.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsafePath, WorkspaceError
from .safefs import DIR_FLAGS, lstat_at, remove_at
from .upper import KINDS, Change, Entry, is_git_path, split_path

_COPY_CHUNK = 1 << 20


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
    plan = [(e, split_path(e.path)) for e in change.entries if not is_git_path(e.path.split("/"))]
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
    return _open_dir(parent_fd, name, lambda exc: UnsafePath(
        f"upper dir changed since it was scanned: {name!r} is no longer a directory ({exc})"))


def _open_repo_dir(parent_fd: int, name: str, uid: int, gid: int) -> int:
    """Open a repo dir, never following a symlink; replace a non-dir with a fresh dir.

    Only reached for a parent whose own entry was already applied, so the fresh-dir case
    exists for hand-built changes; it gets ordinary permissions.
    """
    st = lstat_at(parent_fd, name)
    if st is None or not stat.S_ISDIR(st.st_mode):
        _ensure_dir(parent_fd, name, 0o755, uid, gid)
    # An existing dir keeps the mode its own entry gave it; O_NOFOLLOW catches a late swap.
    return _open_dir_nofollow(parent_fd, name)


def _open_dir_nofollow(parent_fd: int, name: str) -> int:
    # ELOOP/ENOTDIR: someone swapped it for a symlink or file after we made it a dir.
    return _open_dir(parent_fd, name, lambda exc: WorkspaceError(
        f"repository entry {name!r} changed while the job's changes were being applied ({exc}); run the "
        "commit again"))


def _open_dir(parent_fd: int, name: str, error: Callable[[OSError], Exception]) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise error(exc) from exc


def _clear_dir(fd: int) -> None:
    for name in os.listdir(fd):
        remove_at(fd, name)


def _dir_mode(mode: int) -> int:
    return stat.S_IMODE(mode) & 0o777  # no setuid/setgid/sticky


def _file_mode(mode: int) -> int:
    return stat.S_IMODE(mode) & 0o777


def _ensure_dir(parent_fd: int, name: str, mode: int, uid: int, gid: int) -> None:
    st = lstat_at(parent_fd, name)
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
        remove_at(frame.repo_fd, name)
    elif entry.kind == "file":
        _apply_file(frame, name, _file_mode(entry.mode), uid, gid)
    elif entry.kind == "symlink":
        _apply_symlink(frame, name, uid, gid)


def _apply_opaque_dir(parent_fd: int, name: str, mode: int, uid: int, gid: int) -> None:
    """The job removed the dir and made a new one: nothing of the old contents survives."""
    st = lstat_at(parent_fd, name)
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
    remove_at(dir_fd, tmp)
    # O_EXCL|O_NOFOLLOW: we only ever write into an inode we have just created ourselves,
    # never through a symlink or into an existing (possibly hard-linked) file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return tmp, os.open(tmp, flags, mode, dir_fd=dir_fd)


def _replace(dir_fd: int, tmp: str, name: str) -> None:
    """Put ``tmp`` in place of ``name`` in one step (rename cannot replace a dir by a file)."""
    st = lstat_at(dir_fd, name)
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
            remove_at(frame.repo_fd, tmp)
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
    remove_at(frame.repo_fd, tmp)
    os.symlink(target, tmp, dir_fd=frame.repo_fd)
    try:
        os.chown(tmp, uid, gid, dir_fd=frame.repo_fd, follow_symlinks=False)
    except BaseException:
        remove_at(frame.repo_fd, tmp)
        raise
    _replace(frame.repo_fd, tmp, name)
