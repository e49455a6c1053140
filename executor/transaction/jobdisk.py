"""A job's disk: one filesystem of the policy's ``disk`` size holding every layer the executor builds for it.

Owns how the disk cap is enforced on this host (``decide``) and the job directory's ``layers/``: the
workspace upper and work dirs, the home layer, the test views' throwaway layers, the graded gate's
tests-only layer and its run directories. Where this process may make and mount an ext4 image and the
engine sees what it mounts, ``layers/`` is the mount point of ``jobs/<id>/layers.img`` (``loopmount.py``):
whatever the job holds (files deleted but kept open, fallocate, holes a copy filled) comes out of that
filesystem, and the writer gets ENOSPC at the cap. Elsewhere (not root, no CAP_SYS_ADMIN, no loop devices,
an executor in a container whose state root does not propagate its mounts to the host) ``layers/`` is a
plain directory the watchdog measures (``sandbox/disk.py``). What the executor itself writes for a job (the
commit's journal, a sealed job's sockets) lies beside ``layers/``, never on the job's full disk.

Also owns handing a kept change's image to the job that revises it, mounting kept images again after a
reboot, removing a job directory (its image unmounted first) and the start-up sweep of the mounts, loop
devices and probe directories of this state root that no job directory explains.

Must never: remove a job directory while its image is mounted (the removal would descend into the mounted
change), mount one image twice at once (an flock on the image serialises every mount and unmount, across
processes), or touch a mount or loop device outside this state root's job and probe directories.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DiskImageError
from ..settings import Settings
from . import loopmount
from .safefs import DIR_FLAGS, remove_at, remove_tree

log = logging.getLogger(__name__)

IMAGE, LAYERS = "layers.img", "layers"
#: The smallest image made (ext4's journal and tables need room); a smaller ``disk`` is held by the meter.
MIN_IMAGE = 32 * 2**20
PROBE_PREFIX = ".disk-probe-"
_CAP_SYS_ADMIN = 21
#: How to get the image mode where it is not in force.
STRONGER = ("run the executor as root with CAP_SYS_ADMIN, loop devices (/dev/loop-control) and mkfs.ext4 "
            "(e2fsprogs): on the host (README: \"Without compose\"), or in a container that may mount and whose "
            "state root is bind-mounted with rshared propagation")


@dataclass(frozen=True)
class Enforcement:
    """How the policy's ``disk`` holds on this host: ``image`` (a filesystem of that size per job) or
    ``watchdog`` (the job's layers measured every few seconds), why, and how to get the stronger one."""

    mode: str
    why: str
    fix: str | None = None

    @property
    def images(self) -> bool:
        return self.mode == "image"


def decide(settings: Settings, in_container: bool) -> Enforcement:
    """The enforcement ``EXECUTOR_DISK_CAP`` asks for and this host allows (``image`` when it must be and
    cannot: ``ConfigError`` saying why)."""
    if settings.disk_cap == "watchdog":
        return Enforcement("watchdog", "EXECUTOR_DISK_CAP=watchdog: each job's layers are measured every few "
                                       "seconds", "unset EXECUTOR_DISK_CAP to use a disk image per job where "
                                                  "the host allows it")
    problem = cannot(settings.home, in_container)
    if problem is None:
        return Enforcement("image", f"each job's layers are an ext4 image of its policy's disk size, mounted at "
                                    f"{settings.jobs_dir}/<job>/{LAYERS}: the writer gets ENOSPC at the cap")
    if settings.disk_cap == "image":
        raise ConfigError(f"EXECUTOR_DISK_CAP=image, but {problem}; {STRONGER}, or unset EXECUTOR_DISK_CAP")
    return Enforcement("watchdog", f"{problem}: each job's layers are measured every few seconds instead "
                                   "(a fast writer overshoots until the next measurement; an open deleted file "
                                   "is not seen)", STRONGER)


def cannot(home: Path, in_container: bool) -> str | None:
    """Why no disk image can be used for jobs under ``home``, or None (a test image was made and mounted)."""
    if os.geteuid() != 0:
        return "the executor does not run as root"
    if not _has_capability(_CAP_SYS_ADMIN):
        return "the executor may not mount (no CAP_SYS_ADMIN)"
    if not loopmount.LOOP_CONTROL.exists():
        return f"there are no loop devices ({loopmount.LOOP_CONTROL} is missing)"
    if loopmount.mkfs_path() is None:
        return f"{loopmount.MKFS} is not installed (package e2fsprogs)"
    if in_container:
        holding = loopmount.mount_of(home)
        if holding is None or not any(f.startswith("shared:") for f in holding.optional):
            return ("the state root's mount in this container does not propagate to the host (not rshared): "
                    "the engine would not see a job's image")
    try:
        probe(home)
    except (DiskImageError, OSError) as exc:
        return f"a test image could not be made and mounted under {home}: {exc}"
    return None


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def probe(home: Path) -> None:
    """Make, mount, write, unmount and remove a small image under ``home`` (raises what went wrong)."""
    root = home / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    root.mkdir(parents=True, mode=0o700)
    try:
        prepare(root, MIN_IMAGE, keep=False)
        layers = root / LAYERS
        fd = os.open(layers / "probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if not os.path.ismount(layers) or loopmount.usage(layers).size > MIN_IMAGE:
            raise DiskImageError(f"the probe image mounted at {layers} is not the filesystem it wrote to")
    finally:
        remove(root)


# -- one job's layers ---------------------------------------------------------------------------------


@contextmanager
def _locked(image: Path):
    """The image flocked for the block (every mount and unmount of it goes through here), through an fd of
    its own: the loop device keeps the fd it was bound with, and a lock on that one would outlive the
    block. Yields False when there is no image."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


def _mount(image: Path, layers: Path) -> None:
    fd = loopmount.open_image(image)
    try:
        loopmount.mount(fd, layers)
    finally:
        os.close(fd)


def has_image(root: Path) -> bool:
    return os.path.lexists(root / IMAGE)


def prepare(root: Path, size: int | None, keep: bool) -> None:
    """Make ``root/layers`` ready for an attempt: an image of ``size`` bytes mounted there (None: a plain
    directory, measured by the watchdog). ``keep``: the layers an earlier attempt left stay as they are (a
    rate-limited attempt resumes on them, a revision continues the change it took over)."""
    layers = root / LAYERS
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    if keep and (has_image(root) or _filled(layers)):
        attach(root)
    else:
        _drop(root)
        layers.mkdir()
        if size is not None:
            image = root / IMAGE
            loopmount.make(image, max(size, MIN_IMAGE))
            with _locked(image):
                _mount(image, layers)
    os.chmod(layers, 0o711)  # the image's root: only root may list it, as the job dir


def _filled(layers: Path) -> bool:
    try:
        return bool(os.listdir(layers))
    except (FileNotFoundError, NotADirectoryError):
        return False


def attach(root: Path) -> bool:
    """Mount the job's image at its layers if it is not mounted (after a reboot, or in another process);
    True when an image is mounted there now, False when the job has none. ``DiskImageError`` when it
    cannot be mounted."""
    with _locked(root / IMAGE) as found:
        if not found:
            return False
        layers = root / LAYERS
        if not os.path.ismount(layers):
            layers.mkdir(exist_ok=True)
            _mount(root / IMAGE, layers)
        return True


def unattached(root: Path) -> bool:
    """The job has an image that is not mounted at its layers (it could not be mounted again)."""
    return has_image(root) and not os.path.ismount(root / LAYERS)


def attach_all(jobs_dir: Path) -> list[str]:
    """Mount every job's image that is not mounted (after a reboot); the job ids it mounted. One that cannot
    be mounted is logged and left (its job then finds no layers). A job directory of the layout before disk
    images (``upper/`` beside the journal) gets its layers moved into ``layers/`` (renames: a change kept
    across the upgrade is found where the executor now looks)."""
    attached = []
    try:
        names = sorted(os.listdir(jobs_dir))
    except FileNotFoundError:
        return []
    for name in names:
        root = jobs_dir / name
        _upgrade_layout(root)
        if not unattached(root):
            continue
        try:
            attach(root)
            attached.append(name)
        except (DiskImageError, OSError) as exc:
            log.error("job disk image not mounted", extra={"action": "disk_image", "job": name, "error": str(exc)})
    return attached


#: What lies beside ``layers/`` in a job directory: the executor's own files.
BESIDE = frozenset({LAYERS, IMAGE, "commit-journal.json", "sock"})


def _upgrade_layout(root: Path) -> None:
    if not os.path.isdir(root / "upper") or os.path.islink(root / "upper") or os.path.lexists(root / LAYERS):
        return
    os.mkdir(root / LAYERS, 0o711)
    for name in os.listdir(root):
        if name not in BESIDE:
            os.rename(root / name, root / LAYERS / name)


def _detach(root: Path) -> None:
    """Unmount the job's layers (lazily when busy: released when their last user goes)."""
    with _locked(root / IMAGE):
        _unmount_all(root / LAYERS)


def _unmount_all(layers: Path) -> None:
    for _ in range(8):  # a mount stacked on another (never made by us) comes off one at a time
        if not os.path.ismount(layers):
            return
        if not loopmount.unmount(layers):
            log.warning("busy job disk detached lazily", extra={"action": "disk_image", "path": str(layers)})
    if os.path.ismount(layers):
        raise DiskImageError(f"{layers} stays mounted after 8 unmounts; nothing was removed")


def _drop(root: Path) -> None:
    """The job's layers and image go (unmounted first)."""
    _detach(root)
    for name in (LAYERS, IMAGE):
        path = root / name
        if os.path.lexists(path):
            remove_tree(path)


def remove(root: Path) -> None:
    """Remove a job directory: its image unmounted first (lazily when busy), then everything in it."""
    if not os.path.lexists(root):
        return
    _detach(root)
    remove_tree(root)


def hand_over(base: Path, root: Path) -> bool:
    """Give the image in the job directory ``base`` (a kept change) to the job directory ``root``: emptied
    of all but the change (the reviewed job's home and test layers are not the follow-up's), unmounted
    there, renamed (one filesystem: nothing is copied) and mounted here. Each step can be done again after
    a crash. False when ``base`` has no image."""
    image = base / IMAGE
    with _locked(image) as found:
        if not found:
            return False
        layers = base / LAYERS
        if not os.path.ismount(layers):
            layers.mkdir(exist_ok=True)
            _mount(image, layers)
        _keep_only(layers, ("upper", "lost+found"))
        _unmount_all(layers)  # a busy one keeps its loop device: mounted from that device below
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        (root / LAYERS).mkdir(exist_ok=True)
        os.rename(image, root / IMAGE)
        _mount(root / IMAGE, root / LAYERS)
    return True


def _keep_only(layers: Path, names: tuple[str, ...]) -> None:
    fd = os.open(layers, DIR_FLAGS)
    try:
        for name in os.listdir(fd):
            if name not in names:
                remove_at(fd, name)
    finally:
        os.close(fd)


# -- after a crash --------------------------------------------------------------------------------------


def sweep(home: Path) -> list[str]:
    """What a crash between two steps left of this state root's disks: a mount in a job or probe directory
    (``doctor``'s included) that is not a job's image at its layers is unmounted, a loop device bound to a
    file there that nothing mounts is released, and probe directories go. (Job directories themselves are
    retention's.) Returns what it removed."""
    removed: list[str] = []
    jobs = Path(os.path.realpath(home / "jobs"))
    ours = [jobs] + [Path(os.path.realpath(p)) for pattern in (f"{PROBE_PREFIX}*", ".doctor-*")
                     for p in home.glob(pattern)]
    for mounted in loopmount.mounted_below(home):
        target = mounted.target
        if not any(top in target.parents for top in ours):
            continue
        if target.name == LAYERS and target.parent.parent == jobs and has_image(target.parent):
            continue
        loopmount.unmount(target)
        removed.append(str(target))
    in_use = {m.source for m in loopmount.mounts()}
    for loop in loopmount.loops():
        if any(top in loop.backing.parents for top in ours) and loop.device not in in_use:
            loopmount.release(loop.device)
            removed.append(loop.device)
    for probe_dir in home.glob(f"{PROBE_PREFIX}*"):
        remove(probe_dir)
        removed.append(str(probe_dir))
    return removed
