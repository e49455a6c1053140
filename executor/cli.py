"""The ``executor`` command: serve, submit, and look at jobs.

Owns argument parsing and printing. It is the one place that reads the environment: it builds the
``Settings`` and hands ``os.environ`` to the executor as the source of runner credentials.

Must never: change a job's status itself (it asks the store, which refuses illegal moves), or print a
credential.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import click
from pydantic import ValidationError

from . import logs
from .errors import ExecutorError, InvalidJob
from .jobs import parse_spec, validate
from .settings import Settings
from .spool import Spool
from .store import Job, Status, Store


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise click.ClickException(f"bad EXECUTOR_* setting: {exc}") from None


def _store(settings: Settings) -> Store:
    if not settings.db_path.exists():
        raise click.ClickException(f"no database at {settings.db_path}: is EXECUTOR_HOME right?")
    return Store(settings.db_path)


def _job(store: Store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id!r}")
    return job


def job_view(store: Store, job: Job) -> dict[str, Any]:
    """What ``show --json`` prints: the whole story of a job."""
    return {
        "id": job.id,
        "session_id": job.session_id,
        "status": job.status.value,
        "reason": job.reason,
        "error": job.error,
        "runner": job.runner,
        "model_requested": job.model_requested,
        "models_seen": job.models_seen,
        "workspace": job.workspace,
        "policy": job.policy_name,
        "priority": job.priority,
        "prompt": job.prompt,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "attempts": [
            {"number": a.number, "outcome": a.outcome, "exit_code": a.exit_code,
             "claude_session_id": a.claude_session_id, "models_seen": a.models_seen,
             "cost_usd": a.cost_usd, "input_tokens": a.input_tokens, "output_tokens": a.output_tokens,
             "started_at": a.started_at.isoformat(),
             "finished_at": a.finished_at.isoformat() if a.finished_at else None}
            for a in store.attempts(job.id)
        ],
        "changed_files": job.changed_files,
        "tests": {"command": job.test_command, "exit_code": job.test_exit_code, "output_tail": job.test_output},
        "final_text": job.final_text,
    }


@click.group()
def main() -> None:
    """Run Claude Code jobs in containers on overlay workspaces; commit only what passed its tests."""


@main.command()
def serve() -> None:
    """Run the executor until SIGTERM or SIGINT, then stop cleanly (running jobs are re-queued)."""
    from .service import Executor

    settings = _settings()
    logs.configure(settings.log_format, settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        Executor(settings, os.environ).serve(stop)
    except ExecutorError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("file", type=click.File("rb"))
def submit(file: Any) -> None:
    """Validate a job file (or - for stdin) and put it into the spool; prints the job id."""
    settings = _settings()
    raw = file.read()
    try:
        spec = parse_spec(raw)
        valid = validate(spec, settings)
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    if settings.db_path.exists() and Store(settings.db_path).get(valid.id) is not None:
        raise click.ClickException(f"a job with id {valid.id!r} already exists; job ids are unique")
    data = json.loads(raw)
    data["id"] = valid.id  # fix the id now, so the person gets it and a re-read cannot change it
    Spool(settings.spool_dir).write(json.dumps(data, indent=2).encode() + b"\n")
    click.echo(valid.id)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(job_id: str, as_json: bool) -> None:
    """One job: status, why, models, attempts, changed files, tests."""
    store = _store(_settings())
    view = job_view(store, _job(store, job_id))
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    for key in ("id", "session_id", "status", "reason", "error", "runner", "model_requested", "models_seen",
                "workspace", "policy", "created_at", "started_at", "finished_at"):
        if view[key] not in (None, [], ""):
            click.echo(f"{key:16} {view[key]}")
    click.echo(f"{'attempts':16} {len(view['attempts'])}")
    if view["changed_files"]:
        click.echo("changed files:")
        for path in view["changed_files"]:
            click.echo(f"  {path}")
    tests = view["tests"]
    if tests["exit_code"] is not None:
        click.echo(f"tests: {tests['command']} -> exit {tests['exit_code']}")
        for line in (tests["output_tail"] or "").splitlines()[-15:]:
            click.echo(f"  | {line}")


@main.command()
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in Status]))
@click.option("--json", "as_json", is_flag=True)
def jobs(statuses: tuple[str, ...], as_json: bool) -> None:
    """List jobs (optionally of some statuses)."""
    store = _store(_settings())
    rows = store.jobs([Status(s) for s in statuses] if statuses else None)
    if as_json:
        click.echo(json.dumps([{"id": j.id, "status": j.status.value, "runner": j.runner,
                                "session_id": j.session_id, "reason": j.reason,
                                "created_at": j.created_at.isoformat()} for j in rows], indent=2))
        return
    for j in rows:
        click.echo(f"{j.id:20} {j.status.value:12} {j.runner:12} {j.reason or ''}")


def _describe(kind: str, data: dict) -> str:
    if kind == "tool_call":
        detail = data.get("file_path") or data.get("command") or data.get("input") or ""
        return f"{data.get('name')}: {detail}"
    if kind in ("turn", "agent_text"):
        return str(data.get("text", ""))[:300]
    if kind == "tool_result":
        return ("error: " if data.get("is_error") else "") + str(data.get("content", ""))[:200]
    if kind == "state":
        return " ".join(f"{k}={v}" for k, v in data.items() if v not in (None, [], ""))
    return json.dumps(data, default=str)[:300]


@main.command(name="log")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def log_cmd(job_id: str, as_json: bool) -> None:
    """The job's event log: turns, tool calls, file edits, shell commands, results, state changes."""
    store = _store(_settings())
    _job(store, job_id)
    for e in store.events(job_id=job_id):
        if as_json:
            click.echo(json.dumps({"ts": e.ts.isoformat(), "attempt": e.attempt, "kind": e.kind, "data": e.data}))
        else:
            click.echo(f"{e.ts:%H:%M:%S} a{e.attempt} {e.kind:12} {_describe(e.kind, e.data)}")


@main.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True)
def session(session_id: str, as_json: bool) -> None:
    """The arc of a session: every job of it, in order, with its attempts and what happened."""
    store = _store(_settings())
    jobs = [j for j in store.jobs() if j.session_id == session_id]
    if not jobs:
        raise click.ClickException(f"no session {session_id!r}")
    jobs.sort(key=lambda j: j.created_at)
    if as_json:
        click.echo(json.dumps([{**job_view(store, j), "events": [
            {"ts": e.ts.isoformat(), "attempt": e.attempt, "kind": e.kind, "data": e.data}
            for e in store.events(job_id=j.id)]} for j in jobs], indent=2))
        return
    for job in jobs:
        click.echo(f"== job {job.id}  {job.status.value}  runner={job.runner}  attempts={job.attempts}"
                   + (f"  ({job.reason})" if job.reason else ""))
        click.echo(f"   prompt: {job.prompt[:200]}")
        for e in store.events(job_id=job.id):
            if e.kind in ("tool_call", "turn", "state", "tests", "rate_limit", "resume_unavailable", "adopted"):
                click.echo(f"   {e.ts:%H:%M:%S} a{e.attempt} {e.kind:10} {_describe(e.kind, e.data)}")
        if job.changed_files:
            click.echo(f"   changed: {', '.join(job.changed_files)}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Budget, reservations, measured use, running jobs, the queue and why its head waits."""
    settings = _settings()
    from .workspace import disk_usage

    try:
        snapshot = json.loads(settings.status_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        snapshot = {}
    age = time.time() - snapshot.get("ts", 0)
    store = _store(settings)
    view = {
        "executor": "running" if snapshot and age < max(10.0, 5 * settings.poll_interval) else "not running",
        "status_age_seconds": round(age, 1) if snapshot else None,
        "budget": snapshot.get("budget") or {"cpus": settings.budget_cpus, "memory": settings.budget_memory,
                                             "reserve_memory": settings.reserve_memory},
        "reserved": snapshot.get("reserved"),
        "measured": snapshot.get("measured"),
        "running": snapshot.get("running", []),
        "queue_length": len(store.jobs([Status.queued])),
        "waiting": snapshot.get("waiting"),
        "runners": snapshot.get("runners", []),
        "counts": {st.value: n for st, n in store.counts().items()},
        "disk": {"state_root": str(settings.home), "bytes": disk_usage(settings.home)},
    }
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    mib = lambda n: f"{(n or 0) / 2**20:.0f} MiB"  # noqa: E731
    budget = view["budget"]
    click.echo(f"executor   {view['executor']}")
    click.echo(f"budget     {budget['cpus']:g} cpus, {mib(budget['memory'])} (reserve {mib(budget['reserve_memory'])})")
    if view["reserved"]:
        click.echo(f"reserved   {view['reserved']['cpus']:g} cpus, {mib(view['reserved']['memory'])}")
    measured = view["measured"]
    if measured:
        click.echo(f"measured   jobs {measured['jobs']['cpu_cores']:.2f} cores, {mib(measured['jobs']['memory'])}; "
                   f"executor {measured['executor']['cpu_percent']:.1f}% cpu, {mib(measured['executor']['rss'])} rss; "
                   f"host available {mib(measured['host']['memory_available'])}")
    click.echo(f"queue      {view['queue_length']} queued" + (f"; {view['waiting']}" if view["waiting"] else ""))
    click.echo(f"disk       {mib(view['disk']['bytes'])} under {view['disk']['state_root']}")
    for r in view["running"]:
        click.echo(f"  {r['job']:20} {r['runner']:12} {r['cpus']:g} cpus {mib(r['memory'])}  "
                   f"state={r['state']} idle={r['idle_for']} {r['last_activity'] or ''}")
    for r in view["runners"]:
        click.echo(f"runner     {r['runner']:12} {r['state']}; {r['running']} running, {r['waiting']} waiting")


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its supervisor notices (about 1 s)."""
    store = _store(_settings())
    try:
        job = store.request_cancel(job_id)
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    if job.status.terminal:
        click.echo(f"{job.id} {job.status.value}")
    else:
        click.echo(f"{job.id} cancel requested ({job.status.value})")


if __name__ == "__main__":
    sys.exit(main())
