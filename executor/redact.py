"""Redaction: credential values never reach the database, the event log or the executor's log.

Owns scrubbing the runners' secret values (looked up by the names in ``runners.toml``) out of any text
or JSON-like value before it is stored or logged. The agent can print its environment (``env``) and the
CLI can echo headers: what it prints is recorded, so the values are replaced by ``[REDACTED:<VAR>]``.

Must never: hold more than the values it must hide, or log them.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .transaction.safefs import DIR_FLAGS, as_owner, walk

MIN_SECRET = 8  # shorter values would scrub ordinary words


class Redactor:
    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        self._pairs: list[tuple[str, str]] = []
        self.update(secrets or {})

    def update(self, secrets: Mapping[str, str]) -> None:
        pairs = {(value, f"[REDACTED:{name}]") for name, value in secrets.items() if value and len(value) >= MIN_SECRET}
        # longest first, so a secret containing another is replaced whole
        self._pairs = sorted(set(self._pairs) | pairs, key=lambda p: -len(p[0]))

    def text(self, value: str) -> str:
        for secret, mark in self._pairs:
            if secret in value:
                value = value.replace(secret, mark)
        return value

    def bytes(self, data: bytes) -> bytes:
        for secret, mark in self._pairs:
            data = data.replace(secret.encode(), mark.encode())
        return data

    def __call__(self, value: Any) -> Any:
        """``value`` with every secret replaced, through dicts, lists and strings."""
        if not self._pairs:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(v) for v in value)
        return value


def scrub_tree(root: Path, redactor: Redactor, uid: int, gid: int, max_size: int = 64 * 2**20) -> list[str]:
    """Rewrite the files under ``root`` (an attempt's home layer) that hold a secret value.

    The CLI writes what its tools printed into its session transcript; a transcript that says
    ``[REDACTED:VAR]`` still resumes. The tree is the agent's: it is walked from pinned directory fds
    without following a link, and rewritten with the owner's rights (a link planted to a host file is
    never written through, and nothing is written as root). Returns the rewritten files' names.
    """
    try:
        top = os.open(root, DIR_FLAGS)
    except OSError:
        return []
    rewritten: list[str] = []
    try:
        with as_owner(uid, gid):
            for dir_fd, name, st in walk(top):
                if stat.S_ISREG(st.st_mode) and st.st_size <= max_size and _scrub_file(dir_fd, name, redactor):
                    rewritten.append(name)
    finally:
        os.close(top)
    return rewritten


def _scrub_file(dir_fd: int, name: str, redactor: Redactor) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    clean = redactor.bytes(data)
    if clean == data:
        return False
    tmp = f".{name}.redact-{secrets.token_hex(4)}"
    # O_EXCL|O_NOFOLLOW: a fresh inode of our own, never a name the agent prepared.
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  stat.S_IMODE(st.st_mode) & 0o777, dir_fd=dir_fd)
    try:
        view = memoryview(clean)
        while view:
            view = view[os.write(out, view):]
    finally:
        os.close(out)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return True


class RedactingFilter(logging.Filter):
    """Scrubs log records (message arguments and extra fields) before any handler formats them."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor(record.msg) if isinstance(record.msg, str) else record.msg
        if record.args:
            record.args = self.redactor(record.args)
        for key, value in list(vars(record).items()):
            if isinstance(value, (str, dict, list)) and key not in ("msg", "args"):
                setattr(record, key, self.redactor(value))
        return True
