"""The schema's versions: migrations bring every database (SQLite and PostgreSQL, new or made before
migrations existed) to exactly what the models describe, and a database newer than the code is refused."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from executor.errors import SchemaTooNew
from executor.store import Job, Status, Store, schema
from executor.store.engine import make_engine


def differences(url: str) -> list:
    """What autogenerate would write for this database: nothing when the migrations match the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def test_head_is_the_last_revision_of_the_scripts():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(schema.MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_heads() == [schema.HEAD]


def test_a_new_database_is_migrated_to_exactly_the_models(empty_db_url):
    url = empty_db_url
    Store(url).close()
    found = differences(url)
    assert found == [], (f"the migrations and models.py differ on {url.split(':')[0]}: {found}; add a revision "
                         "(executor db revision \"what changed\") and set schema.HEAD")
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == schema.HEAD


def _legacy_database(path: Path) -> None:
    """A database as the executor made it before migrations: main's tables by create_all, an older one
    without some nullable columns, and a job mid-flight."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE job (id VARCHAR NOT NULL PRIMARY KEY, session_id VARCHAR NOT NULL, runner VARCHAR NOT NULL,
            model_requested VARCHAR NOT NULL, workspace VARCHAR NOT NULL, prompt VARCHAR NOT NULL,
            policy_name VARCHAR NOT NULL, policy JSON, test_command VARCHAR, priority INTEGER NOT NULL,
            status VARCHAR(15) NOT NULL, reason VARCHAR, error VARCHAR, spool_name VARCHAR UNIQUE,
            created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME, start_ns INTEGER,
            repo_uid INTEGER, repo_gid INTEGER, attempts INTEGER NOT NULL, cancel_requested BOOLEAN NOT NULL,
            models_seen JSON, changed_files JSON, test_exit_code INTEGER, test_output VARCHAR, final_text VARCHAR,
            retry_at DATETIME, resume_session VARCHAR, limited_attempts INTEGER NOT NULL);
        CREATE INDEX ix_job_status ON job (status);
        CREATE TABLE attempt (id INTEGER NOT NULL PRIMARY KEY, job_id VARCHAR NOT NULL REFERENCES job (id),
            number INTEGER NOT NULL, started_at DATETIME NOT NULL, finished_at DATETIME, outcome VARCHAR,
            exit_code INTEGER, claude_session_id VARCHAR, models_seen JSON, cost_usd FLOAT, input_tokens INTEGER,
            output_tokens INTEGER);
        INSERT INTO job (id, session_id, runner, model_requested, workspace, prompt, policy_name, policy, priority,
            status, created_at, attempts, cancel_requested, limited_attempts)
        VALUES ('old-run', 'old-run', 'r', 'm', '/w/a', 'p', 'default', '{"cpus": 0.5, "memory": 1073741824}', 0,
            'running', '2026-01-01 00:00:00.000000', 1, 0, 0),
               ('old-queued', 'old-queued', 'r', 'm', '/w/b', 'p', 'default', '{}', 3, 'queued',
            '2026-01-01 00:00:01.000000', 0, 0, 0);
    """)
    con.commit()
    con.close()


def test_a_database_made_before_migrations_is_adopted_and_keeps_its_jobs(tmp_path):
    db = tmp_path / "executor.db"
    _legacy_database(db)
    store = Store(db)
    running, queued = store.get("old-run"), store.get("old-queued")
    assert running.status == Status.running and (running.cpus, running.memory) == (0.5, 2**30)
    assert running.workspace_lock == "/w/a" and running.session_lock == "old-run"  # it holds its workspace
    assert queued.status == Status.queued and (queued.cpus, queued.memory) == (1.0, 2 * 2**30)
    assert queued.workspace_lock is None
    columns = {c["name"] for c in inspect(store.engine).get_columns("job")}
    assert {"skills", "compaction", "workspace_dev", "host_id", "workspace_lock"} <= columns
    assert {"heartbeat", "event", "compaction", "host", "runnerstate"} <= set(inspect(store.engine).get_table_names())
    store.add_job(Job(id="new", session_id="new", runner="r", model_requested="m", workspace="/w/c", prompt="p",
                      policy_name="default", skills=["a"], compaction="model"))
    assert store.get("new").skills == ["a"]
    store.close()


def test_a_schema_newer_than_the_code_is_refused(tmp_path):
    db = tmp_path / "executor.db"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = '9999'")
    con.commit()
    con.close()
    with pytest.raises(SchemaTooNew, match="9999"):
        Store(db)


def test_processes_opening_a_new_database_at_once_migrate_it_once(empty_db_url):
    url = empty_db_url
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_it():
        barrier.wait()
        try:
            Store(url).close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*), min(version_num) FROM alembic_version")).one() == (1, schema.HEAD)


def test_executor_db_upgrade_and_current(tmp_path):
    from click.testing import CliRunner

    from executor.surfaces.cli import main

    env = {"EXECUTOR_HOME": str(tmp_path / "home")}
    before = CliRunner().invoke(main, ["db", "current"], env=env)
    assert before.exit_code == 1 and f"empty (this executor: {schema.HEAD})" in before.output
    done = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert done.exit_code == 0 and f"empty -> {schema.HEAD}" in done.output
    again = CliRunner().invoke(main, ["db", "upgrade"], env=env)
    assert again.exit_code == 0 and f"at {schema.HEAD} already" in again.output
    after = CliRunner().invoke(main, ["db", "current"], env=env)
    assert after.exit_code == 0 and f"{schema.HEAD} (this executor: {schema.HEAD})" in after.output


def test_a_migration_at_start_logs_one_line_not_alembics_chatter(tmp_path):
    """The start-up log of a new store: the store's own line per upgrade, none of Alembic's plugin and step
    lines (a process configured as ``executor serve`` configures its logging)."""
    import subprocess
    import sys

    program = ("import sys; from pathlib import Path; from executor import logs; logs.configure('text', 'INFO'); "
               "from executor.store import Store; Store(Path(sys.argv[1])).close(); Store(Path(sys.argv[1])).close()")
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "executor.db")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines  # the second open finds the schema current: nothing to say
    assert "store schema upgraded" in lines[0] and f"before=empty after={schema.HEAD}" in lines[0]


def test_attempts_recorded_before_their_status_existed_get_how_they_ended(empty_db_url):
    """Revision 0005's backfill: an earlier attempt ended waiting for a retry (its agent was rate limited) or
    interrupted; a job's last attempt has the job's status (an interrupted one when the job is queued again)."""
    from alembic import command
    from alembic.config import Config

    url = empty_db_url
    old = make_engine(url)
    with old.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(schema.MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
        for job_id, status, reason, attempts in (("failed", "failed", "sandbox", 3), ("queued", "queued", None, 1),
                                                 ("running", "running", "interrupted", 2)):
            conn.execute(text(
                "INSERT INTO job (id, session_id, runner, model_requested, workspace, prompt, policy_name, priority, "
                "status, reason, created_at, attempts, cancel_requested, limited_attempts) VALUES (:id, :id, 'r', "
                "'m', '/w', 'p', 'default', 0, :status, :reason, '2026-01-01 00:00:00', :attempts, false, 0)"),
                {"id": job_id, "status": status, "reason": reason, "attempts": attempts})
        for job_id, number, outcome in (("failed", 1, "rate_limited"), ("failed", 2, None), ("failed", 3, None),
                                        ("queued", 1, "success"), ("running", 1, "overloaded"), ("running", 2, None)):
            conn.execute(text("INSERT INTO attempt (job_id, number, started_at, outcome) VALUES "
                              "(:job, :number, '2026-01-01 00:00:00', :outcome)"),
                         {"job": job_id, "number": number, "outcome": outcome})
    old.dispose()
    store = Store(url)
    try:
        seen = {(j, a.number): (a.status, a.reason) for j in ("failed", "queued", "running")
                for a in store.attempts(j)}
    finally:
        store.close()
    assert seen == {("failed", 1): ("waiting_retry", "rate_limited"), ("failed", 2): ("interrupted", None),
                    ("failed", 3): ("failed", "sandbox"), ("queued", 1): ("interrupted", "interrupted"),
                    ("running", 1): ("waiting_retry", "overloaded"), ("running", 2): ("running", None)}
