"""The database engine of either kind: a SQLite file (one host) or a PostgreSQL server (several hosts).

Owns building the SQLAlchemy engine from ``EXECUTOR_DATABASE_URL`` with each engine's guarantees: SQLite in
WAL mode with FULL synchronous commits, a 30 s busy timeout and foreign keys on every connection;
PostgreSQL through psycopg 3 with every session in UTC, a connect timeout and connections checked before
use (a restarted server costs one retry, not a crash), and a new connection that waits with backoff while
the server refuses (``health.patient_connect``). Also how a URL is shown (never with its password).

Must never: log or return a URL with its password, or change a connection's isolation level behind the
store's back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlmodel import create_engine

from .health import patient_connect

#: The channel new work is announced on (PostgreSQL LISTEN/NOTIFY).
CHANNEL = "executor_jobs"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (the CLI) run beside the writer; FULL makes a committed row survive power loss.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    _wal(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _wal(cursor: Any) -> None:
    """Switch a new database to WAL. The switch needs the database to itself and does not wait for it:
    while another process migrates a brand-new file, try again (up to the busy timeout)."""
    import sqlite3
    import time

    deadline = time.monotonic() + 30
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """The engine for ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=16, pool_recycle=1800,
                           connect_args={"options": "-c timezone=UTC", "connect_timeout": 10,
                                         "application_name": "executor"})
    event.listen(engine, "do_connect", patient_connect)
    return engine


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def shown(url: str) -> str:
    """The URL as it may be printed or logged: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def libpq_dsn(url: str) -> str:
    """The URL as psycopg itself takes it (for the LISTEN connection, which bypasses SQLAlchemy)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
