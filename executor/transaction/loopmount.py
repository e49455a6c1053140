"""Loop-mounted filesystem images: made, mounted, unmounted, and found again after a crash.

Owns the kernel calls behind a job's disk image (``jobdisk.py`` decides when):

* ``make``: a sparse file of the size asked for, formatted ext4 by ``mkfs.ext4`` with 4 KiB blocks, no
  blocks reserved for root (writes through an overlay carry the mounter's root credentials, so a root
  reserve would not hold a job back anyway) and inode tables and journal initialised lazily: a 10 GiB
  image costs a few hundred KiB of the host's disk and about 10 ms.
* ``mount``: a loop device configured onto the image with autoclear (it goes with its last user: an
  unmount, or the close of a failed mount) and direct I/O (the job's data is not cached twice), then
  mount(2) with ``nosuid,nodev``, ``noinit_itable`` (no background zeroing that would fill the sparse
  file) and ``discard`` (a deleted file's blocks go back to the host). An image whose filesystem still
  lives on a loop device (a busy mount detached lazily) is mounted from that device again, so one image
  never has two filesystems.
* ``unmount``: umount2 without following a link; lazily when busy (the filesystem and its loop device are
  released when their last user goes).
* what is mounted and which loop devices exist below a directory (``/proc/self/mountinfo``,
  ``/sys/block/loop*/loop/backing_file``), and releasing a loop device nothing mounts.

Must never: unmount, or release a loop device, that it was not pointed at; open an image through a symlink;
or leave a loop device configured when its mount failed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiskImageError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

LOOP_CONTROL = Path("/dev/loop-control")
_LOOP_CTL_GET_FREE, _LOOP_CONFIGURE, _LOOP_CLR_FD = 0x4C82, 0x4C0A, 0x4C01
_LO_FLAGS_AUTOCLEAR, _LO_FLAGS_DIRECT_IO = 4, 16
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8
BLOCK = 4096
MKFS = "mkfs.ext4"
#: Where mkfs.ext4 is looked for: the system's own directories, never a path a setting or job could change.
SYSTEM_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
MKFS_OPTIONS = ["-q", "-F", "-b", str(BLOCK), "-m", "0", "-i", "8192", "-I", "256", "-O", "^resize_inode",
                "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"]
MOUNT_OPTIONS = b"noinit_itable,discard"
_IMAGE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64), ("lo_rdevice", ctypes.c_uint64),
                ("lo_offset", ctypes.c_uint64), ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * 64),
                ("lo_crypt_name", ctypes.c_uint8 * 64), ("lo_encrypt_key", ctypes.c_uint8 * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32), ("info", _LoopInfo64),
                ("reserved", ctypes.c_uint64 * 8)]


def mkfs_path() -> str | None:
    return shutil.which(MKFS, path=SYSTEM_PATH)


def make(path: Path, size: int) -> None:
    """A new ext4 image of ``size`` bytes at ``path`` (which must not exist: never written through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    mkfs = mkfs_path()
    try:
        if mkfs is None:
            raise DiskImageError(f"{MKFS} is not installed (package e2fsprogs): no disk image can be made")
        done = subprocess.run([mkfs, *MKFS_OPTIONS, str(path)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise DiskImageError(f"{MKFS} failed on {path} (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    except BaseException:
        os.unlink(path)
        raise


def open_image(path: Path) -> int:
    """The image's fd, read-write, never through a link (FileNotFoundError when there is none)."""
    return os.open(path, _IMAGE_FLAGS)


def mount(image_fd: int, target: Path) -> str:
    """Mount the ext4 image open at ``image_fd`` at ``target``; returns the loop device. An image a loop
    device already holds is mounted from that device (the same filesystem, never a second one)."""
    device = holder(image_fd)
    loop = None
    try:
        if device is None:
            device, loop = _configure(image_fd)
        if _libc.mount(device.encode(), os.fsencode(target), b"ext4", _MS_NOSUID | _MS_NODEV, MOUNT_OPTIONS) != 0:
            code = ctypes.get_errno()
            raise DiskImageError(f"cannot mount the disk image on {device} at {target}: {os.strerror(code)}")
    finally:
        if loop is not None:
            os.close(loop)  # autoclear: a device whose mount failed is released with this close
    return device


def _configure(image_fd: int) -> tuple[str, int]:
    """A free loop device bound to the image (autoclear, direct I/O), and its open fd."""
    control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(32):  # another process may take the free device between asking and binding
            device = f"/dev/loop{fcntl.ioctl(control, _LOOP_CTL_GET_FREE)}"
            loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                _bind(loop, image_fd)
                return device, loop
            except OSError as exc:
                os.close(loop)
                if exc.errno != errno.EBUSY:
                    raise DiskImageError(f"cannot bind a loop device to the disk image: {exc.strerror}") from None
        raise DiskImageError("no loop device stayed free long enough to bind the disk image to it")
    finally:
        os.close(control)


def _bind(loop: int, image_fd: int) -> None:
    config = _LoopConfig(fd=image_fd, block_size=BLOCK)
    config.info.lo_flags = _LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO
    try:
        fcntl.ioctl(loop, _LOOP_CONFIGURE, bytes(config))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        config.info.lo_flags = _LO_FLAGS_AUTOCLEAR  # a backing filesystem without direct I/O
        fcntl.ioctl(loop, _LOOP_CONFIGURE, bytes(config))


def unmount(target: Path) -> bool:
    """Unmount ``target``: True when it is gone now (or was no mount), False when it was busy and only
    detached (its filesystem and loop device go when their last user does)."""
    path = os.fsencode(target)
    if _libc.umount2(path, _UMOUNT_NOFOLLOW) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOENT):
        return True
    if code != errno.EBUSY:
        raise DiskImageError(f"cannot unmount {target}: {os.strerror(code)}")
    if _libc.umount2(path, _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        code = ctypes.get_errno()
        raise DiskImageError(f"cannot detach the busy mount {target}: {os.strerror(code)}")
    return False


@dataclass(frozen=True)
class Usage:
    """Of one filesystem: its size for files, the bytes in use (files open but deleted included), the bytes
    and the inodes a writer may still take."""

    size: int
    used: int
    free: int
    inodes_free: int


def usage(path: Path) -> Usage:
    st = os.statvfs(path)
    return Usage(st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize,
                 st.f_favail)


# -- what exists: mounts and loop devices ------------------------------------------------------------


@dataclass(frozen=True)
class Mounted:
    target: Path
    source: str
    fstype: str
    optional: tuple[str, ...]  # mountinfo's optional fields: shared:N, master:N, ...


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Mounted]:
    """Every mount of this process's namespace, in mountinfo's order (parents before children)."""
    found = []
    for line in mountinfo.read_text(errors="surrogateescape").splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        found.append(Mounted(Path(_unescape(fields[4])), _unescape(fields[sep + 2]), fields[sep + 1],
                             tuple(fields[6:sep])))
    return found


def mounted_below(top: Path) -> list[Mounted]:
    """The mounts strictly below ``top`` (resolved), deepest first: the order to unmount them in."""
    top = Path(os.path.realpath(top))
    below = [m for m in mounts() if top in m.target.parents]
    return sorted(below, key=lambda m: len(m.target.parts), reverse=True)


def mount_of(path: Path) -> Mounted | None:
    """The mount holding ``path`` (resolved): the deepest mount point at or above it."""
    path = Path(os.path.realpath(path))
    holding = [m for m in mounts() if m.target == path or m.target in path.parents]
    return max(holding, key=lambda m: len(m.target.parts)) if holding else None


@dataclass(frozen=True)
class Loop:
    device: str
    backing: Path
    deleted: bool


def loops(sys_block: Path = Path("/sys/block")) -> list[Loop]:
    """Every loop device bound to a file."""
    found = []
    for entry in sorted(sys_block.glob("loop*")):
        try:
            text = (entry / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue  # not bound
        deleted = text.endswith(" (deleted)")
        found.append(Loop(f"/dev/{entry.name}", Path(text.removesuffix(" (deleted)")), deleted))
    return found


def holder(image_fd: int) -> str | None:
    """The loop device bound to the image open at ``image_fd`` on which a filesystem still lives (a mount
    detached lazily while busy), if any: mounting that device again gives the same filesystem. A device bound
    to it that nothing holds (being released after an unmount) is not one."""
    st = os.fstat(image_fd)
    for loop in loops():
        if loop.deleted:
            continue
        try:
            here = os.stat(loop.backing, follow_symlinks=False)
        except OSError:
            continue
        if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino) and _held(loop.device):
            return loop.device
    return None


def _held(device: str) -> bool:
    """A filesystem holds the block device (it opens it exclusively): an exclusive open is refused."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)  # nothing held it (an autoclear device goes with this close, as it would have anyway)
    return False


def release(device: str) -> None:
    """Release a loop device: now when nothing uses it, else when its last user goes (autoclear)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, _LOOP_CLR_FD, 0)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: already free
            raise DiskImageError(f"cannot release the loop device {device}: {exc.strerror}") from None
    finally:
        os.close(fd)
