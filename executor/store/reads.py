"""Read-only queries for the command line, on the driver itself (``sqlite3``, or libpq for a PostgreSQL
store: ``libpq.py``): what ``executor show``, ``jobs`` and an idle ``status`` read, without importing SQLAlchemy (a fifth
of a second) or building the schema.

Owns turning rows of the ``job``, ``attempt``, ``event``, ``apirequest`` and ``host`` tables into plain records
(JSON columns decoded, times as aware UTC datetimes, the status as ``Status``) shaped like the ORM's, so the
same views print them, and the view of a host row that ``executor status`` shows (``host_view``, also used
by the serving loop).

Must never: write (the database is opened read-only).
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
                         "evaluation", "git"},
                "attempt": {"models_seen"}, "event": {"data"}, "apirequest": {"rate_limits"}}
TIME_COLUMNS = {"job": {"created_at", "started_at", "finished_at", "retry_at", "review_since", "reviewed_at",
                        "interrupted_at"},
                "attempt": {"started_at", "finished_at"}, "event": {"ts"}, "apirequest": {"ts"},
                "host": {"started_at", "last_seen", "stopped_at", "lost_at"}}
JSON_COLUMNS["host"] = {"workspace_roots", "storage"}


class _Postgres:
    """A PostgreSQL connection that takes the same ``?`` placeholders as sqlite3 and yields mapping rows: on
    libpq itself (``libpq.py``: no psycopg import, a third of a second of CPU), else on psycopg."""

    def __init__(self, url: str) -> None:
        from . import libpq

        try:
            libpq.load()
        except OSError:
            self.conn = _psycopg(url)
        else:
            self.conn = libpq.Connection(url)

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> _Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _psycopg(url: str) -> Any:
    import psycopg
    from psycopg.rows import dict_row

    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    return psycopg.connect(dsn, row_factory=dict_row, autocommit=True, connect_timeout=10,
                           options="-c default_transaction_read_only=on -c timezone=UTC")


def connect(target: Path | str) -> Any:
    """``target``: the SQLite file (opened read-only), or a ``postgresql+psycopg://`` URL."""
    if isinstance(target, str) and target.startswith("postgresql"):
        return _Postgres(target)
    conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def _record(table: str, row: Any) -> SimpleNamespace:
    data: dict[str, Any] = dict(row)
    for name in JSON_COLUMNS[table]:
        if isinstance(data.get(name), str):  # psycopg decodes JSON itself
            data[name] = json.loads(data[name])
    for name in TIME_COLUMNS[table]:
        value = data.get(name)
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value is not None:
            data[name] = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if table == "job":  # an apirequest's status is the HTTP status the API answered
        data["status"] = Status(data["status"])
    return SimpleNamespace(**data)


def job(conn: Any, job_id: str) -> SimpleNamespace | None:
    row = conn.execute("SELECT * FROM job WHERE id = ?", (job_id,)).fetchone()
    return _record("job", row) if row is not None else None


def attempts(conn: Any, job_id: str) -> list[SimpleNamespace]:
    rows = conn.execute("SELECT * FROM attempt WHERE job_id = ? ORDER BY number", (job_id,))
    return [_record("attempt", row) for row in rows]


def events(conn: Any, job_id: str, kinds: Iterable[str]) -> list[SimpleNamespace]:
    """A job's events of these kinds, oldest first."""
    kinds = list(kinds)
    marks = ", ".join("?" * len(kinds))
    rows = conn.execute(f"SELECT * FROM event WHERE job_id = ? AND kind IN ({marks}) ORDER BY id", (job_id, *kinds))
    return [_record("event", row) for row in rows]


def api_requests(conn: Any, job_id: str) -> list[SimpleNamespace]:
    """The requests a sealed job's gateway forwarded, oldest first."""
    rows = conn.execute("SELECT * FROM apirequest WHERE job_id = ? ORDER BY id", (job_id,))
    return [_record("apirequest", row) for row in rows]


def followers(conn: Any, job_id: str) -> list[str]:
    """The ids of the jobs made from this one (retries, revisions), oldest first."""
    return [row["id"] for row in conn.execute("SELECT id FROM job WHERE follows = ? ORDER BY created_at", (job_id,))]


def recent_jobs(conn: Any, statuses: Iterable[Status] | None = None, runner: str | None = None,
                session_id: str | None = None, limit: int = 50, host: str | None = None) -> list[SimpleNamespace]:
    """The newest jobs first, filtered, at most ``limit`` (an index on ``created_at`` keeps this quick)."""
    where, args = [], []
    if statuses is not None:
        names = [st.value for st in statuses]
        where.append(f"status IN ({', '.join('?' for _ in names)})")
        args += names
    for column, value in (("runner", runner), ("session_id", session_id), ("host_id", host)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(f"SELECT * FROM job {clause} ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit))
    return [_record("job", row) for row in rows]


def counts(conn: Any) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) AS n FROM job GROUP BY status")
    return {Status(row["status"]).value: row["n"] for row in rows}


def hosts(conn: Any, timeout: float = 60.0, now: datetime | None = None) -> list[dict]:
    """Every host sharing the store as ``executor status`` shows it (by this machine's clock)."""
    rows = [_record("host", row) for row in conn.execute("SELECT * FROM host ORDER BY id")]
    now = now or datetime.now(timezone.utc)
    return [host_view(row, now, timeout) for row in rows]


def host_view(host: Any, now: datetime, timeout: float) -> dict:
    """A host row as ``executor status`` shows it: alive, stopped (cleanly) or lost (silent for longer than
    ``timeout``), with its budget, what it holds and when it was last seen."""
    last_seen = host.last_seen if host.last_seen.tzinfo else host.last_seen.replace(tzinfo=timezone.utc)
    age = max(0.0, (now - last_seen).total_seconds())
    state = "stopped" if host.stopped_at else "lost" if age > timeout else "alive"
    alive = state == "alive"
    return {
        "host": host.id, "state": state, "version": host.version, "last_seen": last_seen.isoformat(),
        "last_seen_seconds": round(age, 1), "budget": {"cpus": host.budget_cpus, "memory": host.budget_memory},
        "reserved": {"cpus": host.reserved_cpus if alive else 0.0, "memory": host.reserved_memory if alive else 0},
        "running": host.running if alive else 0, "waiting": host.waiting if alive else None,
        "workspace_roots": host.workspace_roots,
        "storage": getattr(host, "storage", None) or {},  # each root's storage (intake/storage.py)
    }
