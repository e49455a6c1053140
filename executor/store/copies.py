"""Copies of the store: a consistent backup of a SQLite store while it is in use.

Owns ``backup_sqlite``: SQLite's online backup API, in steps (the serving executor keeps writing between
them; the copy is one transaction's view), then the copy's job count and integrity check.

Must never: write to the source, or over an existing file (the caller refuses one).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def backup_sqlite(source: Path, target: Path, pages: int = 4096) -> tuple[int, str]:
    """Copy the SQLite store ``source`` to the new file ``target``; returns (jobs in the copy, integrity)."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    writer = sqlite3.connect(target)
    try:
        reader.backup(writer, pages=pages)
        jobs = writer.execute("SELECT COUNT(*) FROM job").fetchone()[0]
        check = writer.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        writer.close()
        reader.close()
    return int(jobs), str(check)
