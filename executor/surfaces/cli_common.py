"""What every ``executor`` command shares: the settings, the store, a job by id, a job's full view.

Owns turning a bad setting or a missing state root into a message a person can act on.

Must never: write to the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .git_view import git_view
from .seal_view import api_view, egress_denials, network_view

if TYPE_CHECKING:  # loaded when a command needs them: pydantic-settings and SQLAlchemy are slow to import
    from ..settings import Settings
    from ..store import Job, Store


def load_settings() -> Settings:
    from pydantic import ValidationError

    from ..errors import UnknownSetting
    from ..settings import Settings

    try:
        return Settings()
    except UnknownSetting as exc:
        raise click.ClickException(str(exc)) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "EXECUTOR_" + "_".join(str(p) for p in err["loc"][:1]).upper()
            problems.append(f"{name}={os.environ.get(name, '')!r}: {err['msg'].removeprefix('Value error, ')}")
        raise click.ClickException("bad setting: " + "; ".join(problems)) from None


def state_root() -> Path:
    """Where the state root is, for the commands that only read the serving loop's snapshot (``status``,
    ``health``): ``EXECUTOR_HOME`` as ``Settings`` reads it, without loading pydantic-settings, so that they
    answer in a blink. Every other setting they need is in the snapshot; without a fresh one they build the
    full ``Settings``."""
    return Path(os.environ.get("EXECUTOR_HOME") or "store").expanduser().absolute()


def open_store(settings: Settings, create: bool = False) -> Store:
    """The store ``EXECUTOR_DATABASE_URL`` (or the state root's SQLite file) names; a missing SQLite file is
    an error unless ``create``, an unreachable or too new database a message."""
    if not create and not settings.store_exists:
        raise click.ClickException(f"no database at {settings.db_path}: is EXECUTOR_HOME right?")
    from sqlalchemy.exc import OperationalError

    from ..errors import SchemaTooNew
    from ..store import Store
    from ..store.engine import shown

    try:
        return Store(settings.db_url)
    except SchemaTooNew as exc:
        raise click.ClickException(str(exc)) from None
    except OperationalError as exc:
        raise click.ClickException(f"cannot open the store {shown(settings.db_url)}: {exc.orig}") from None


def get_job(store: Store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id!r}")
    return job


def read_only():
    """The database opened read-only on its driver (``store/reads.py``: sqlite3, or psycopg for
    ``EXECUTOR_DATABASE_URL``), for ``show``, ``jobs`` and an idle ``status``: like ``state_root``, without
    loading pydantic-settings or SQLAlchemy."""
    from ..store import reads

    url = os.environ.get("EXECUTOR_DATABASE_URL")
    if url and url.startswith("postgresql"):
        try:
            return reads.connect(url)
        except Exception as exc:  # noqa: BLE001 - psycopg's errors, without importing them up front
            from ..store.engine import shown

            raise click.ClickException(f"cannot open the store {shown(url)}: {exc}") from None
    path = Path(url[len("sqlite:///"):]) if url and url.startswith("sqlite:///") else state_root() / "executor.db"
    if not path.exists():
        raise click.ClickException(f"no database at {path}: is EXECUTOR_HOME right?")
    return reads.connect(path)


def job_view(job: Job, attempts: list, events: list, api_requests: list, followed_by: list[str] | None = None,
             waiting: str | None = None) -> dict[str, Any]:
    """What ``show --json`` prints: the whole story of a job (``attempts``: its attempt rows, in order;
    ``events``: at least its events of the kinds in ``seal_view.SEAL_EVENTS``; ``api_requests``: its gateway's
    rows; ``followed_by``: the ids of the jobs made from it; ``waiting``: why a queued job has not started)."""
    return {
        "id": job.id,
        "session_id": job.session_id,
        "status": job.status.value,
        "reason": job.reason,
        "error": job.error,
        "runner": job.runner,
        "agent": job.agent,
        "model_requested": job.model_requested,
        "models_seen": job.models_seen,
        "workspace": job.workspace,
        "host": job.host_id,
        "interrupted_at": job.interrupted_at.isoformat() if job.interrupted_at else None,
        "policy": job.policy_name,
        "priority": job.priority,
        "prompt": job.prompt,
        "follows": job.follows,
        "builds_on": job.builds_on,
        "followed_by": followed_by or [],
        "waiting": waiting,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "attempts": [
            {"number": a.number, "host": a.host_id, "status": getattr(a, "status", None),
             "reason": getattr(a, "reason", None), "outcome": a.outcome, "exit_code": a.exit_code,
             "agent_session_id": a.agent_session_id, "models_seen": a.models_seen,
             "cost_usd": a.cost_usd, "input_tokens": a.input_tokens, "output_tokens": a.output_tokens,
             "started_at": a.started_at.isoformat(),
             "finished_at": a.finished_at.isoformat() if a.finished_at else None}
            for a in attempts
        ],
        "changed_files": job.changed_files,
        "git": git_view(getattr(job, "git", None), job.id),
        "tests": {"command": job.test_command, "exit_code": job.test_exit_code, "output_tail": job.test_output},
        "evaluation": job.evaluation,
        "final_text": job.final_text,
        "review": {"reasons": job.review_reasons, "since": job.review_since.isoformat() if job.review_since else None,
                   "reviewed_at": job.reviewed_at.isoformat() if job.reviewed_at else None,
                   "reviewed_by": job.reviewed_by, "note": job.review_note, "files": job.review_files},
        "skills": job.skills,
        "context": job.context,
        "compaction": job.compaction,
        "network": network_view(job),
        "egress_denied": egress_denials(events),
        "api": api_view(api_requests, events),
    }


#: What ``show`` lists of the graded gate's record, in order: (record key, label).
EVALUATION_LISTS = (("fail_to_pass", "fail-to-pass"), ("broken", "broken"), ("flaky", "flaky"),
                    ("failing", "failing"), ("weak", "weak"))


def evaluation_lines(record: dict | None, limit: int = 20) -> list[str]:
    """The graded gate's record for a terminal: verdict, the named tests, coverage gained, the runs."""
    if not record:
        return []
    proved = {True: "proved", False: "not proved", None: "no tests to prove"}.get(record.get("proved"), "")
    lines = [f"evaluation: {record.get('kind') or '-'} -> {record.get('verdict')}"
             + (f" ({proved})" if record.get("kind") else "")]
    for key, label in EVALUATION_LISTS:
        tests = record.get(key) or []
        if tests:
            lines.append(f"  {label}:")
            lines.extend(f"    {t}" for t in tests[:limit])
            if len(tests) > limit:
                lines.append(f"    ... and {len(tests) - limit} more")
    coverage = record.get("coverage")
    if coverage:
        lines.append(f"  coverage gained: {coverage.get('lines')} lines, {coverage.get('branches')} branches "
                     f"(code lines covered before: {coverage.get('before')})")
    runs = ", ".join(f"{r['run']} " + ("cached" if r.get("cached") else f"exit {r.get('exit_code')} "
                                       f"{r.get('duration', 0):.1f}s")
                     + (f" ({r['tests_reported']} tests)" if r.get("tests_reported") is not None else "")
                     for r in record.get("runs") or [])
    if runs:
        lines.append(f"  runs: {runs}")
    if record.get("before_cache"):
        lines.append(f"  before cache: {record['before_cache']}")
    return lines

