"""Pinned-descriptor file operations on trees a job could write (upper dirs, session homes, repositories).

Owns the primitives every host-side walk uses: opening a path beneath a trusted root with no symlink
anywhere on it (``openat2`` with ``RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH``, or a component-by-component
``O_NOFOLLOW | O_DIRECTORY`` walk where the kernel lacks it), a directory's identity (device, inode,
owner), ``lstat`` at a directory fd, removing a tree without following a link, the disk a tree uses, and
``as_owner``: this thread's file-system identity dropped to a repository owner's uid and gid, so that a
mistake writes with the owner's rights and never with root's.

Must never: follow a symlink, resolve a path a job could have changed by name once a descriptor for its
parent is held, or change the credentials of any thread but the calling one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)
# Raw syscall numbers: glibc's setgroups() changes every thread of the process, the raw call only this one.
_SYSCALLS = {"x86_64": {"openat2": 437, "setgroups": 116}, "aarch64": {"openat2": 437, "setgroups": 159}}
_NR = _SYSCALLS.get(platform.machine(), {})
_RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x04, 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Identity(NamedTuple):
    """What makes a directory the same directory: its device and inode, and its owner."""

    dev: int
    ino: int
    uid: int
    gid: int

    @classmethod
    def of(cls, fd: int) -> Identity:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_uid, st.st_gid)


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


def open_beneath(root_fd: int, rel: str) -> int:
    """Open the directory ``rel`` below ``root_fd`` with no symlink anywhere on the way and no step out
    (``..``). Raises OSError (ELOOP for a link, EXDEV for a step out, ENOTDIR, ENOENT)."""
    parts = [p for p in PurePosixPath(rel).parts if p != "/"]
    if any(p in (".", "..") for p in parts) or rel.startswith("/"):
        raise OSError(errno.EXDEV, f"{rel!r} climbs out of its root")
    if not parts:
        return os.dup(root_fd)
    nr = _NR.get("openat2")
    if nr is not None:
        how = _OpenHow(DIR_FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH)
        fd = _libc.syscall(nr, root_fd, os.fsencode("/".join(parts)), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter refusing openat2
            raise OSError(code, f"{os.strerror(code)}: {rel}")
    return open_dir_path(root_fd, parts)


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
    with mode 000 (overlay's work dir); as root none of that stops the removal. ``path``'s parent is a
    directory of the executor's own (under the state root), never one a job can write.
    """
    path = Path(path)
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_at(parent_fd, path.name)
    finally:
        os.close(parent_fd)


def walk(top_fd: int, strict: bool = False) -> Iterator[tuple[int, str, os.stat_result]]:
    """Every entry below the directory ``top_fd``: (its directory's fd, its name, its lstat). Directories
    are entered from their parent's fd with ``O_NOFOLLOW``; one that vanishes or turns into something else
    meanwhile is skipped, or raises OSError when ``strict``. The fds yielded are valid only until the next
    step."""
    stack = [os.dup(top_fd)]
    try:
        while stack:
            fd = stack.pop()
            try:
                for name in os.listdir(fd):
                    st = lstat_at(fd, name)
                    if st is None:
                        if strict:
                            raise FileNotFoundError(name)
                        continue
                    yield fd, name, st
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            stack.append(os.open(name, DIR_FLAGS, dir_fd=fd))
                        except OSError:
                            if strict:
                                raise
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)


def usage(top_fd: int) -> int:
    """Bytes of disk the tree below ``top_fd`` uses (allocated blocks, so sparse files count what they hold)."""
    return sum(st.st_blocks * 512 for _fd, _name, st in walk(top_fd))


def copy_fd(src: int, dst: int) -> None:
    """Copy the regular file ``src`` into the empty file ``dst``, holes kept: only the ranges that hold data
    (``SEEK_DATA``/``SEEK_HOLE``) are copied, at their offsets, and the size is set at the end, so a sparse
    file stays sparse and the copy never holds more blocks than the source (a 1 TB file of holes costs
    nothing). Works across file systems (``copy_file_range`` where the kernel can, else pread/pwrite); a file
    with several hard links lands as an independent copy. The size is the one ``src`` had when the copy began."""
    size = os.fstat(src).st_size
    offset = written = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # holes to the end
            if exc.errno != errno.EINVAL:
                raise
            start = offset  # no SEEK_DATA here: everything is data
            end = size
        else:
            end = min(size, os.lseek(src, start, os.SEEK_HOLE))
        if start >= size:
            break
        written = _copy_range(src, dst, start, end)
        offset = end
    if written < size:
        os.ftruncate(dst, size)  # a hole at the end (or nothing but holes)


def _copy_range(src: int, dst: int, start: int, end: int) -> int:
    """Bytes ``start`` to ``end`` of ``src`` to the same offsets of ``dst``; returns where the copy ended."""
    position = start
    ranged = True
    while position < end:
        count = min(end - position, 1 << 30)
        done = 0
        if ranged:
            try:
                done = os.copy_file_range(src, dst, count, position, position)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                ranged = False
                continue
        else:
            done = _pwrite_all(dst, os.pread(src, min(count, 1 << 20), position), position)
        if done == 0:
            break  # the source shrank meanwhile: it ends here
        position += done
    return position


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)
    return written


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding ``fd`` to disk: one call instead of one fsync per file."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@contextmanager
def as_owner(uid: int, gid: int) -> Iterator[None]:
    """This thread's file-system uid and gid (and its groups) become the owner's for the block.

    The kernel drops the capabilities that let root ignore permissions and ownership (DAC override,
    chown, fowner, fsetid) while the file-system uid is not 0, so every write in the block is checked as
    the owner's. Other threads keep root's credentials: the change is per thread (raw ``setfsuid``,
    ``setfsgid`` and ``setgroups``).
    """
    if os.geteuid() != 0 or uid == 0:
        yield  # not root (tests as a user, or root's own files): nothing to drop
        return
    groups = os.getgroups()
    _setgroups([gid])
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    try:
        if _libc.setfsuid(0xFFFFFFFF) != uid:  # -1 reads the current value; a refused change is fatal
            raise PermissionError(errno.EPERM, f"cannot take the file-system identity of uid {uid}")
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)
        _setgroups(groups)


def _setgroups(groups: list[int]) -> None:
    nr = _NR.get("setgroups")
    if nr is None:
        return
    array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    if _libc.syscall(nr, len(groups), array) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setgroups: {os.strerror(code)}")
