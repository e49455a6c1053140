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


def write(path: Path, text: str | bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def opaque(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "user.overlay.opaque", b"y")
