"""Read-only queries for the command line, on plain ``sqlite3``: what ``executor show``, ``jobs`` and an idle
``status`` read, without importing SQLAlchemy (a fifth of a second) or building the schema.

Owns turning rows of the ``job`` and ``attempt`` tables into plain records (JSON columns decoded, times as
aware UTC datetimes, the status as ``Status``) shaped like the ORM's, so the same views print them.

Must never: write (the database is opened read-only), or be used for a store that is not a SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .status import Status

#: Columns the ORM stores as JSON and as datetimes (tests/unit/test_store.py checks these against the models).
JSON_COLUMNS = {"job": {"policy", "models_seen", "changed_files", "review_reasons", "review_files", "skills",
                         "evaluation"},
                "attempt": {"models_seen"}, "event": {"data"}, "apirequest": {"rate_limits"}}
TIME_COLUMNS = {"job": {"created_at", "started_at", "finished_at", "retry_at", "review_since", "reviewed_at"},
                "attempt": {"started_at", "finished_at"}, "event": {"ts"}, "apirequest": {"ts"}}


def connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def _record(table: str, row: sqlite3.Row) -> SimpleNamespace:
    data: dict[str, Any] = dict(row)
    for name in JSON_COLUMNS[table]:
        if data.get(name) is not None:
            data[name] = json.loads(data[name])
    for name in TIME_COLUMNS[table]:
        if data.get(name) is not None:
            data[name] = datetime.fromisoformat(data[name]).replace(tzinfo=timezone.utc)
    if table == "job":  # an apirequest's status is the HTTP status the API answered
        data["status"] = Status(data["status"])
    return SimpleNamespace(**data)


def job(conn: sqlite3.Connection, job_id: str) -> SimpleNamespace | None:
    row = conn.execute("SELECT * FROM job WHERE id = ?", (job_id,)).fetchone()
    return _record("job", row) if row is not None else None


def attempts(conn: sqlite3.Connection, job_id: str) -> list[SimpleNamespace]:
    rows = conn.execute("SELECT * FROM attempt WHERE job_id = ? ORDER BY number", (job_id,))
    return [_record("attempt", row) for row in rows]


def events(conn: sqlite3.Connection, job_id: str, kinds: Iterable[str]) -> list[SimpleNamespace]:
    """A job's events of these kinds, oldest first."""
    kinds = list(kinds)
    marks = ", ".join("?" * len(kinds))
    rows = conn.execute(f"SELECT * FROM event WHERE job_id = ? AND kind IN ({marks}) ORDER BY id", (job_id, *kinds))
    return [_record("event", row) for row in rows]


def api_requests(conn: sqlite3.Connection, job_id: str) -> list[SimpleNamespace]:
    """The requests a sealed job's gateway forwarded, oldest first."""
    rows = conn.execute("SELECT * FROM apirequest WHERE job_id = ? ORDER BY id", (job_id,))
    return [_record("apirequest", row) for row in rows]


def followers(conn: sqlite3.Connection, job_id: str) -> list[str]:
    """The ids of the jobs made from this one (retries, revisions), oldest first."""
    return [row[0] for row in conn.execute("SELECT id FROM job WHERE follows = ? ORDER BY created_at", (job_id,))]


def recent_jobs(conn: sqlite3.Connection, statuses: Iterable[Status] | None = None, runner: str | None = None,
                session_id: str | None = None, limit: int = 50) -> list[SimpleNamespace]:
    """The newest jobs first, filtered, at most ``limit`` (an index on ``created_at`` keeps this quick)."""
    where, args = [], []
    if statuses is not None:
        names = [st.value for st in statuses]
        where.append(f"status IN ({', '.join('?' for _ in names)})")
        args += names
    for column, value in (("runner", runner), ("session_id", session_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(f"SELECT * FROM job {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
    return [_record("job", row) for row in rows]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {Status(st).value: n for st, n in conn.execute("SELECT status, COUNT(*) FROM job GROUP BY status")}
