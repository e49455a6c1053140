"""The store when the machine under it fails: which errors mean "the database is away" rather than a bug, how
long a connection attempt waits for it to come back, and the serving loop's view of it.

Owns three things. ``unavailable`` tells the errors of a store that cannot be reached or written (a
PostgreSQL restart or a dropped connection, SQLite's ``SQLITE_BUSY`` after its busy timeout, a full disk)
from every other error, which stays a bug. ``patient_connect`` makes a new connection wait for the database
with backoff (up to ``PATIENCE`` seconds by default; the serving loop's thread asks for none, see
``patience``), so a restart of a few seconds costs a job thread a pause, not its attempt. ``StoreHealth`` is
the serving loop's record of the outage (since when, why, when to try again) that admission and the status
read.

Must never: retry a statement (a retried write may have been committed already; the caller decides what a
failed write means), or hide an error that is not the database being away.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any

from sqlalchemy import exc as sa

from ..clock import utcnow

log = logging.getLogger(__name__)

#: Seconds a new connection waits for a database that refuses it (a job thread, the heartbeat).
PATIENCE = 30.0
#: The serving loop's backoff while the store fails (seconds): its store work is cheap to try.
FIRST_DELAY, MAX_DELAY = 0.5, 5.0
_local = threading.local()


def patience(seconds: float | None = None) -> float:
    """This thread's patience for a new connection; ``seconds`` sets it (the serving loop sets 0: it never
    waits on the database, it tries again at its next round)."""
    if seconds is not None:
        _local.seconds = seconds
    return getattr(_local, "seconds", PATIENCE)


def unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) says the store cannot be reached or written now."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError,
                              sqlite3.OperationalError)):
            return True
        if isinstance(error, sa.DBAPIError) and error.connection_invalidated:
            return True
        if _psycopg_operational(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _psycopg_operational(error: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))


def patient_connect(dialect: Any, _record: Any, cargs: tuple, cparams: dict) -> Any:
    """SQLAlchemy's ``do_connect`` hook: connect, and while the database refuses (down, starting up,
    shutting down), try again with backoff for this thread's ``patience``."""
    deadline = time.monotonic() + patience()
    delay = 0.1
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class StoreHealth:
    """The serving loop's view of the store: answering, or failing since a moment (with why); while it
    fails, the loop tries its store work again with backoff (0.5 s doubling to 5 s) instead of every tick."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.since: str | None = None  # UTC, ISO: when the store first failed
        self.error: str | None = None
        self._delay = FIRST_DELAY
        self._next = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """Whether the loop does its store work this round (always while the store answers)."""
        return not self.down or self.clock() >= self._next

    def failed(self, error: BaseException) -> None:
        text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        if not self.down:
            self.since = utcnow().isoformat()
            log.warning("store unavailable: claims and intake pause", extra={"action": "store_down", "error": text})
        else:
            self._delay = min(self._delay * 2, MAX_DELAY)
        self.error = text
        self._next = self.clock() + self._delay

    def answered(self) -> None:
        if self.down:
            log.warning("store answers again", extra={"action": "store_up", "since": self.since})
        self.since, self.error, self._delay = None, None, FIRST_DELAY

    def reason(self) -> str | None:
        if not self.down:
            return None
        return f"the store is unavailable since {self.since[11:19]} UTC ({self.error})"

    def view(self) -> dict:
        return {"state": "unavailable" if self.down else "ok", "since": self.since, "error": self.error}
