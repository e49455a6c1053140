"""Schema versions: every database is brought to the code's revision through Alembic, never past it.

Owns the migrations' location, the revision this code expects (``HEAD``, checked against the scripts by a
test), and ``ensure`` / ``upgrade``: the cheap check every opener of the store makes (one SELECT when the
schema is current) and the upgrade itself, taken under a lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL
advisory lock) so two processes opening a new database at once run each migration exactly once. A
database made before migrations existed (SQLite, by ``create_all``) is adopted by the first revision.

Must never: open a database whose schema is newer than the code (``SchemaTooNew``), or migrate outside the
lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..errors import SchemaTooNew

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
#: The revision this code's models describe: a new revision changes it (tests/unit/test_migrations.py).
HEAD = "0008"
_LOCK_KEY = 0x6578_6563  # PostgreSQL advisory lock of schema changes ("exec")


def current(conn: Connection) -> str | None:
    """The database's revision, or None when it has none (new, or made before migrations)."""
    if conn.dialect.name == "sqlite":
        exists = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"))
    else:
        exists = conn.execute(text("SELECT 1 WHERE to_regclass('alembic_version') IS NOT NULL"))
    if exists.scalar() is None:
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def ensure(engine: Engine) -> None:
    """Make sure the schema is the code's: nothing when it is, an upgrade when it is older, ``SchemaTooNew``
    when it is newer."""
    with engine.connect() as conn:
        revision = current(conn)
        conn.rollback()
    if revision != HEAD:
        upgrade(engine)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to ``HEAD`` under the lock; returns (revision before, revision after)."""
    from alembic import command
    from alembic.config import Config

    with _locked(engine) as conn:
        before = current(conn)
        if before == HEAD:
            return before, HEAD
        known = known_revisions()
        if before is not None and before not in known:
            raise SchemaTooNew(
                f"the database's schema is at revision {before!r}, which this executor does not know (it knows up "
                f"to {HEAD!r}): a newer executor migrated it; run the same version on every host")
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    log.info("store schema upgraded", extra={"action": "schema", "before": before or "empty", "after": HEAD})
    return before, HEAD


def known_revisions() -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the schema lock; committed at the end."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, waited for up to the busy timeout
        else:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
