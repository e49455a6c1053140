"""Building overlay upper dirs by hand, the way overlayfs (mounted with ``userxattr``) leaves them:
whiteouts are 0/0 character devices, opaque dirs carry ``user.overlay.opaque=y``. Shared by the commit
and review unit tests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def require_root() -> None:
    # Whiteouts are device files and commits chown to the repository owner: the executor runs as root,
    # and so do these tests (CI does). Not root is a failure, never a silent skip.
    if os.geteuid() != 0:
        pytest.fail("these tests need root (mknod of whiteouts, chown): run the suite as root", pytrace=False)


def require_user_xattrs(where: Path) -> None:
    probe = where / "xattr-probe"
    probe.mkdir()
    try:
        os.setxattr(probe, "user.overlay.opaque", b"y")
    except OSError as exc:  # pragma: no cover - depends on the host fs
        pytest.fail(f"filesystem of {where} has no user xattrs (overlay's userxattr needs them): {exc}")
    finally:
        probe.rmdir()


#: Who owns what these helpers make: the agent wrote the upper dir, the owner owns the repository, and they
#: are the same uid (the agent runs as the repository's owner).
OWNER = 1000


def write(path: Path, text: str | bytes, mode: int | None = None) -> Path:
    _mkdirs(path.parent)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.chown(path, OWNER, OWNER)  # before chmod: a chown by root would clear a setuid bit set first
    if mode is not None:
        os.chmod(path, mode)
    return path


def _mkdirs(path: Path) -> None:
    if path.is_dir():
        return
    _mkdirs(path.parent)
    path.mkdir()
    os.chown(path, OWNER, OWNER)


def own_dirs(root: Path) -> None:
    """Give every directory under ``root`` to the owner (a test that made some with plain mkdir); files keep
    their owner (a chown would clear their setuid bits)."""
    for dirpath, _dirs, _files in os.walk(root):
        os.lchown(dirpath, OWNER, OWNER)


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque(path: Path) -> None:
    _mkdirs(path)
    os.setxattr(path, "user.overlay.opaque", b"y")
