"""Which storage each workspace root is: what tells two hosts' roots of one path apart, or the same.

A workspace root is a path on one host. Two hosts that each mount a directory of their own at
``/srv/workspaces`` (the README's second-host recipe) hold different repositories under the same path; two
hosts that mount one NFS export there, or two executors on one machine sharing one directory, hold the same.
Paths cannot tell these apart, so each root carries a marker: the file ``.executor-storage`` at the root,
holding a random identity (32 hex digits). The first host to serve a root writes it (as the root's owner,
created beside and linked into place, so two hosts starting at once agree on one); every host reads it at
start and records it in the store with its roots. A job's workspace then lies on the storage of the root
it is under, as the accepting host read it (``job.storage``), and only hosts whose root at that path is the
same storage claim it (``store/queue.py``). Detection, not declaration: it needs no setting, it is right
on both kinds of set-up without anyone knowing which they have, and it stays right when storage is
re-mounted elsewhere. A root where no marker can be written (read-only) and none is found is this host's
alone (``local:<host id>``); writing the marker by hand on shared read-only storage shares it.

Must never: follow a link at the root (the marker is opened with ``O_NOFOLLOW`` from the root's fd, and only a
regular file of the exact form counts), write as root what the root's owner could write, or give two
distinct storages one identity of its own making.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..transaction.safefs import as_owner
from ..transaction.upper import STORAGE_MARKER

log = logging.getLogger(__name__)

MARKER = STORAGE_MARKER
_IDENTITY = re.compile(r"[0-9a-f]{32}")
_MAX = 128  # bytes read of a marker: a real one is 33
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def local(host_id: str) -> str:
    """The identity of a root no other host can share (no marker could be written or read)."""
    return f"local:{host_id}"


def identify(roots: Iterable[Path | str], host_id: str, create: bool = False) -> dict[str, str]:
    """Each root's storage identity, by its path as configured. ``create``: write the marker where there is
    none (``executor serve`` at start); otherwise a root without one is this host's alone."""
    found = {}
    for root in roots:
        path = str(root).rstrip("/") or "/"
        try:
            found[path] = _read_or_create(Path(path), create) or local(host_id)
        except OSError as exc:
            log.warning("workspace root without a storage marker: its jobs run on this host only", extra={
                "action": "storage", "root": path, "error": exc.strerror or str(exc)})
            found[path] = local(host_id)
    return found


def storage_of(storage: Mapping[str, str], workspace: str | Path) -> str | None:
    """The storage ``workspace`` lies on: that of the deepest root it is under (None: under none)."""
    path = str(workspace)
    best = None
    for root in storage:
        if (path == root or path.startswith(root.rstrip("/") + "/")) and (best is None or len(root) > len(best)):
            best = root
    return storage[best] if best is not None else None


def _read_or_create(root: Path, create: bool) -> str | None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root is the person's configuration
    try:
        found = _read(fd, root)
        if found is not None or not create:
            return found
        st = os.fstat(fd)
        with as_owner(st.st_uid, st.st_gid):
            _create(fd)
        return _read(fd, root)
    finally:
        os.close(fd)


def _read(root_fd: int, root: Path) -> str | None:
    """The identity in the root's marker; None when there is none. A marker that is not one (a link, not a
    regular file, another content) is an ``OSError`` saying so."""
    try:
        fd = os.open(MARKER, _FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OSError(exc.errno, f"{root / MARKER} cannot be read as a storage marker ({exc.strerror}): remove it "
                                 "and restart the executor") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, f"{root / MARKER} is not a regular file: remove it and restart the executor")
        text = os.read(fd, _MAX).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not _IDENTITY.fullmatch(text):
        raise OSError(0, f"{root / MARKER} does not hold a storage identity (32 hex digits): remove it and "
                         "restart the executor, which writes a new one")
    return text


def _create(root_fd: int) -> None:
    """Write a fresh identity beside the marker's place and link it there: when two hosts start at once on
    shared storage, one link wins and both then read the winner's."""
    temp = f"{MARKER}.{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    try:
        os.write(fd, (secrets.token_hex(16) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, MARKER, src_dir_fd=root_fd, dst_dir_fd=root_fd, follow_symlinks=False)
    except FileExistsError:
        pass  # another host wrote one first: its identity is the root's
    finally:
        os.unlink(temp, dir_fd=root_fd)
