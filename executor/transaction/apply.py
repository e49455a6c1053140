"""Writing a job's ``Change`` (read from its upper dir) into the repository.

Owns ``apply_change``, done with the repository owner's file-system identity (``safefs.as_owner``), so
nothing is ever written with root's rights. Two phases, each idempotent: first directories, deletions,
replaced directories and symlinks, then files. When the upper dir and the repository share a filesystem
and a journal is given, a file is *moved* into place (renamed: no copy, whatever its size) after its
owner and mode are set on the upper inode; otherwise (a job's disk image is a filesystem of its own) it is
copied, holes kept (``safefs.copy_fd``), into a fresh temp file and renamed over the target. The journal
(``jobs/<id>/commit-journal.json``, written before anything is touched) records the plan, each file's upper
inode and which phase is done, so a crash mid-commit is repaired by running it again: a file no longer in
the upper dir is done when the repository holds its inode. A small change is made durable file by file (an
fsync of each file and directory); a large one by one ``syncfs`` of the filesystem before moving and one at
the end, instead of an fsync per file.

Every path is walked component by component with directory fds and ``O_NOFOLLOW`` on both sides.

Must never: follow a symlink out of the repository, create a device file, fifo or socket, keep
setuid/setgid/sticky bits, write through an existing hard link or symlink, move an inode that has other
links, or touch anything under a ``.git`` directory. A change holding something unsafe is refused whole
(``UnsafePath``): a partial commit would not be what the tests ran against.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsafePath, WorkspaceError
from .journal import Plan, load, save
from .safefs import DIR_FLAGS, as_owner, copy_fd, lstat_at, remove_at, syncfs
from .upper import KINDS, Change, Entry, is_git_path, split_path

#: Up to this many files a commit fsyncs each file and directory; beyond, one syncfs is cheaper.
FSYNC_EACH = 200


def apply_change(change: Change, upper: Path, repo_fd: int, uid: int, gid: int, journal: Path | None = None) -> None:
    """Write ``change`` (read from ``upper``) into the repository open at ``repo_fd``, as ``uid``:``gid``.

    With ``journal`` (a file in a directory only root can write), the plan is journaled and files may be
    moved; when the journal already exists, its plan is the one carried out (``change`` is ignored: the
    upper dir is no longer complete after an interrupted move).
    """
    plan = load(journal)
    if plan is None:
        plan = planned(change)
        save(journal, plan)
    # A small change is made durable file by file; a large one by syncfs, once before the moves (what the
    # agent wrote is on disk before its inodes change names) and once at the end. (syncfs flushes the whole
    # filesystem, everyone's writes: cheaper than 200,000 fsyncs, dearer than ten on a busy disk.)
    each = sum(1 for e in plan.entries if e.kind == "file") <= FSYNC_EACH
    # Opened with root's rights (the state root may be closed to the owner); below it, only the owner's.
    upper_fd = os.open(upper, DIR_FLAGS)
    try:
        same_fs = journal is not None and os.fstat(upper_fd).st_dev == os.fstat(repo_fd).st_dev
        with as_owner(uid, gid):
            if same_fs and not each:
                syncfs(repo_fd)
            if not plan.structure_done:
                _run(plan.entries, upper_fd, repo_fd, uid, gid, _Mode(files=False, move=False, each=each))
                if not each:
                    syncfs(repo_fd)  # the deletions and directories are on disk before the journal says so
        if not plan.structure_done:
            plan.structure_done = True
            save(journal, plan)
        with as_owner(uid, gid):
            _run(plan.entries, upper_fd, repo_fd, uid, gid, _Mode(files=True, move=same_fs, each=each))
            if not each:
                syncfs(repo_fd)
    finally:
        os.close(upper_fd)


def planned(change: Change) -> Plan:
    """The plan that applies ``change``: every entry but those under a ``.git`` directory, each path checked
    first (``UnsafePath`` when the change holds something that is never applied: nothing is)."""
    _check(change)
    return Plan([e for e in change.entries if not is_git_path(e.path.split("/"))])


def _check(change: Change) -> None:
    if change.refused:
        listed = "; ".join(f"{r.path}: {r.reason}" for r in change.refused[:20])
        more = " ..." if len(change.refused) > 20 else ""
        raise UnsafePath(
            f"refusing to apply the job's changes: {len(change.refused)} path(s) must never be "
            f"written to the repository ({listed}{more}); nothing was applied",
            paths=[r.path for r in change.refused],
        )
    # Validate every path before writing anything, so a bad entry cannot leave half a commit.
    for entry in change.entries:
        split_path(entry.path)
        if entry.kind not in KINDS:
            raise UnsafePath(f"refusing entry {entry.path!r}: unknown kind {entry.kind!r}")


@dataclass
class _Mode:
    """How one phase runs: on files or the rest, moving or copying, fsyncing each or relying on syncfs. The
    first rename across mount points (same filesystem, bind-mounted twice, as under compose) turns moving
    off for the rest of the phase."""

    files: bool
    move: bool
    each: bool


def _run(entries: list[Entry], upper_fd: int, repo_fd: int, uid: int, gid: int, mode: _Mode) -> None:
    """One phase: the file entries (``mode.files``) or all the others, parents before children."""
    walker = _Walker(upper_fd, repo_fd, uid, gid, fsync_dirs=mode.each)
    try:
        for entry in entries:
            if (entry.kind == "file") != mode.files:
                continue
            parts = split_path(entry.path)
            walker.enter(parts[:-1])
            if mode.files:
                _apply_file(walker.top, entry, parts[-1], uid, gid, mode)
            else:
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

    def __init__(self, upper_fd: int, repo_fd: int, uid: int, gid: int, fsync_dirs: bool = False) -> None:
        self.uid, self.gid, self.fsync_dirs = uid, gid, fsync_dirs
        self.stack: list[_Frame] = []
        upper_fd = os.dup(upper_fd)
        try:
            repo_fd = os.dup(repo_fd)
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
            _close_frame(self.stack.pop(), self.fsync_dirs)
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
            _close_frame(self.stack.pop(), self.fsync_dirs)


def _close_frame(frame: _Frame, fsync: bool = False) -> None:
    try:
        if fsync:
            os.fsync(frame.repo_fd)  # the renames and unlinks in this dir are durable
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


def _apply_file(frame: _Frame, entry: Entry, name: str, uid: int, gid: int, mode: _Mode) -> None:
    # O_NONBLOCK: if the upper entry became a fifo since the scan, open must not hang.
    src_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        src = os.open(name, src_flags, dir_fd=frame.upper_fd)
    except FileNotFoundError:
        _check_moved(frame, entry, name)
        return
    except OSError as exc:
        raise UnsafePath(f"upper file {name!r} changed since it was scanned ({exc})") from exc
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or (entry.ino and st.st_ino != entry.ino):
            raise UnsafePath(f"upper entry {name!r} is no longer the file the job wrote")
        # A file with other links stays a copy: moving it would share an inode with the upper dir.
        if mode.move and st.st_nlink == 1 and _move(frame, src, name, _file_mode(entry.mode), uid, gid, mode):
            return
        tmp, dst = _make_temp(frame.repo_fd, name, 0o600)
        try:
            copy_fd(src, dst)
            os.fchown(dst, uid, gid)
            os.fchmod(dst, _file_mode(entry.mode))
            if mode.each:
                os.fsync(dst)  # content on disk before the rename makes it visible
        except BaseException:
            os.close(dst)
            remove_at(frame.repo_fd, tmp)
            raise
        os.close(dst)
    finally:
        os.close(src)
    _replace(frame.repo_fd, tmp, name)


def _move(frame: _Frame, src: int, name: str, mode: int, uid: int, gid: int, how: _Mode) -> bool:
    """Rename the upper inode into the repository; False when it cannot be (then it is copied)."""
    target = lstat_at(frame.repo_fd, name)
    try:
        os.fchown(src, uid, gid)  # on the inode held open: the name cannot be swapped under these
        os.fchmod(src, mode)
        if how.each:
            os.fsync(src)
        if target is not None and stat.S_ISDIR(target.st_mode):
            shutil.rmtree(name, dir_fd=frame.repo_fd)
        os.rename(name, name, src_dir_fd=frame.upper_fd, dst_dir_fd=frame.repo_fd)
    except PermissionError:
        return False  # another user's file (kept by copy-up), or an upper dir made read-only: copy instead
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        how.move = False
        return False
    moved = lstat_at(frame.repo_fd, name)
    if moved is None or moved.st_ino != os.fstat(src).st_ino:
        raise UnsafePath(f"upper entry {name!r} was replaced while it was moved into the repository")
    return True


def _check_moved(frame: _Frame, entry: Entry, name: str) -> None:
    """An upper file already gone: an interrupted commit moved it, so the repository holds its inode."""
    here = lstat_at(frame.repo_fd, name)
    if not (entry.ino and here is not None and here.st_ino == entry.ino):
        raise UnsafePath(f"upper file {name!r} is gone and the repository does not hold it: the change cannot "
                         "be completed")


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
