"""Redaction: credential values never reach the database, the event log or the executor's log.

Owns scrubbing the runners' secret values (looked up by the names in ``runners.toml``) out of any text
or JSON-like value before it is stored or logged. The agent can print its environment (``env``) and the
CLI can echo headers: what it prints is recorded, so the values are replaced by ``[REDACTED:<VAR>]``.

Must never: hold more than the values it must hide, or log them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def scrub_tree(root: Path, redactor: Redactor, max_size: int = 64 * 2**20) -> list[Path]:
    """Rewrite the files under ``root`` (the agent's session home) that hold a secret value.

    The CLI writes what its tools printed into its session transcript; a transcript that says
    ``[REDACTED:VAR]`` still resumes. Symlinks are never followed. Returns the files rewritten.
    """
    rewritten = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or st.st_size > max_size:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            clean = redactor.bytes(data)
            if clean != data:
                tmp = path.with_name(f".{name}.redact")
                tmp.write_bytes(clean)
                os.chown(tmp, st.st_uid, st.st_gid)
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
                os.replace(tmp, path)
                rewritten.append(path)
    return rewritten


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
