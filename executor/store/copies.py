"""Copies of the store: a consistent backup of a SQLite store while it is in use, and a store's whole history
carried into an empty one (a host moving from its SQLite file to a PostgreSQL store several hosts share).

Owns ``backup_sqlite`` (SQLite's online backup API, in steps: the serving executor keeps writing between
them; the copy is one transaction's view), ``copy_history`` (every table, in the order their foreign keys
need, in one transaction on the target, which must hold no job; PostgreSQL's id sequences then continue
after the copied rows) and ``left_behind`` (how many jobs a SQLite file holds beside a PostgreSQL store that
holds none: a switch that started an empty history) and ``serving_hosts`` (a copy waits until no host serves
its source).

Must never: write to the source, write over an existing file or into a store that already holds jobs, or
log or return a URL with its password.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import func, insert, select, text
from sqlmodel import SQLModel

from . import models  # noqa: F401 - registers the tables on SQLModel.metadata
from .engine import make_engine, shown

BATCH = 1000  # rows per INSERT: memory stays bounded whatever the history's size


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


class TargetNotEmpty(Exception):
    """The target store already holds jobs: a copy would mix two histories."""


def copy_history(source_url: str, target_url: str) -> dict[str, int]:
    """Copy every row of the store ``source_url`` into the store ``target_url`` (both at this executor's
    schema: ``Store`` brings them there first); returns the rows copied per table. ``TargetNotEmpty`` when the
    target holds a job."""
    from .store import Store

    for url in (source_url, target_url):
        Store(url).close()  # each at this executor's schema revision
    source, target = make_engine(source_url), make_engine(target_url)
    copied: dict[str, int] = {}
    try:
        with source.connect() as reader, target.begin() as writer:
            held = writer.execute(select(func.count()).select_from(SQLModel.metadata.tables["job"])).scalar()
            if held:
                raise TargetNotEmpty(f"{shown(target_url)} already holds {held} jobs: copy only into an empty store")
            for table in SQLModel.metadata.sorted_tables:  # a job before its attempts
                copied[table.name] = 0
                rows = reader.execution_options(stream_results=True).execute(select(table))
                while batch := rows.mappings().fetchmany(BATCH):
                    writer.execute(insert(table), [dict(row) for row in batch])
                    copied[table.name] += len(batch)
            if writer.dialect.name == "postgresql":
                _continue_sequences(writer)
    finally:
        source.dispose()
        target.dispose()
    return copied


def _continue_sequences(conn) -> None:
    """PostgreSQL hands out ids from a sequence, which copied rows did not advance: start after them."""
    for table in SQLModel.metadata.sorted_tables:
        id_column = table.columns.get("id")
        if id_column is None or not id_column.autoincrement or str(id_column.type) != "INTEGER":
            continue
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                          f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))


def serving_hosts(url: str, timeout: float) -> list[str]:
    """The hosts that still serve the store ``url`` (their heartbeat is recent and they did not stop)."""
    from . import reads

    conn = reads.connect(Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else url)
    try:
        return [h["host"] for h in reads.hosts(conn, timeout) if h["state"] == "alive"]
    finally:
        conn.close()


def left_behind(sqlite_path: Path, url: str) -> int:
    """The jobs the SQLite file ``sqlite_path`` holds when the PostgreSQL store ``url`` holds none (0 when it
    holds some, or there is no such file): a switch of the store that started an empty history."""
    from . import reads

    if not url.startswith("postgresql") or not sqlite_path.is_file():
        return 0
    try:
        old = reads.connect(sqlite_path)
        try:
            kept = sum(reads.counts(old).values())
        finally:
            old.close()
    except sqlite3.Error:
        return 0  # not a store (or not one yet): nothing was left behind
    if not kept:
        return 0
    with reads.connect(url) as new:
        exists = new.execute("SELECT to_regclass('job') IS NOT NULL AS made").fetchone()["made"]
        return 0 if exists and sum(reads.counts(new).values()) else kept
