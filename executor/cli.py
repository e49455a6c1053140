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
        "review": {"reasons": job.review_reasons, "since": job.review_since.isoformat() if job.review_since else None,
                   "reviewed_at": job.reviewed_at.isoformat() if job.reviewed_at else None,
                   "reviewed_by": job.reviewed_by, "note": job.review_note, "files": job.review_files},
        "skills": job.skills,
        "context": job.context,
        "compaction": job.compaction,
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
                "workspace", "policy", "created_at", "started_at", "finished_at", "skills", "context", "compaction"):
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
@click.option("--context", "context", is_flag=True,
              help="Print the brief the session's next job would get, and how each part of it was made.")
@click.option("--full", "full", is_flag=True, help="Print the raw history the brief replaces.")
@click.option("--skill", "skills", multiple=True, help="With --context: a skill the next job names (in full).")
def session(session_id: str, as_json: bool, context: bool, full: bool, skills: tuple[str, ...]) -> None:
    """The arc of a session: every job of it, in order, with its attempts and what happened."""
    settings = _settings()
    store = _store(settings)
    jobs = [j for j in store.jobs() if j.session_id == session_id]
    if not jobs:
        raise click.ClickException(f"no session {session_id!r}")
    if context or full:
        _session_context(settings, store, session_id, context, full, list(skills), as_json)
        return
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


def _session_context(settings: Settings, store: Store, session_id: str, context: bool, full: bool,
                     skills: list[str], as_json: bool) -> None:
    """``session --context`` / ``--full``: read-only. The brief uses the summaries the store already holds
    (the small model is not called); an item without one is shown as the structural line, marked so."""
    from . import compaction

    earlier = compaction.earlier_jobs(store, None, session_id)
    out: dict[str, Any] = {"session_id": session_id, "earlier_jobs": [j.id for j in earlier]}
    if context:
        brief = compaction.build(store, session_id, None, settings.policies / "skills", None, full_skills=skills)
        cached = {}
        for row in store.compactions(session_id=session_id):
            if row.model and row.summary:
                cached[(row.kind, row.subject, tuple(row.event_ids or []))] = row
        parts = []
        for item in brief.items if brief else []:
            row = cached.get((item.kind, item.subject, tuple(item.event_ids)))
            if row is not None:
                item.summary = row.summary
            parts.append({"kind": item.kind, "subject": item.subject, "events": len(item.event_ids),
                          "source_size": len(item.source.encode()),
                          "made_by": (f"{row.model} (row {row.id}, job {row.job_id})" if row is not None else
                                      "structural (no summary yet: the next job's compaction writes one)"
                                      if item.prompt else "skill file description")})
        text = ""
        if brief is not None:
            mode = "model" if all(p["made_by"].startswith(settings.compaction_model) or not i.prompt
                                  for p, i in zip(parts, brief.items)) else "structural"
            text = compaction.render(brief.history, brief.items, settings.policies / "skills", skills,
                                     mode, None if mode == "model" else "summaries not written yet")
        last = [e.data for j in reversed(earlier) for e in store.events(job_id=j.id) if e.kind == "compaction"][:1]
        out.update({"brief": text, "brief_size": len(text.encode()), "parts": parts,
                    "last_compaction": {k: v for k, v in last[0].items() if k != "brief"} if last else None})
    if full:
        raw = compaction.raw_history(store, session_id, earlier)
        out.update({"history": raw, "history_size": len(raw.encode())})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    if context:
        click.echo(out["brief"] or "(no earlier settled job and no skill: the next job starts without a brief)")
        click.echo(f"-- how it was made ({out['brief_size']} bytes):")
        for part in out["parts"]:
            click.echo(f"   {part['kind']:12} {part['subject']:32} {part['source_size']:>7} B of history -> "
                       f"{part['made_by']}")
        if out["last_compaction"]:
            lc = out["last_compaction"]
            click.echo(f"-- the last job's compaction: {lc.get('mode')}" + (f" ({lc['reason']})" if lc.get("reason") else "")
                       + (f", ${lc.get('cost_usd')}, {lc.get('latency')} s" if lc.get("cost_usd") is not None else ""))
    if full:
        click.echo(out["history"])
        click.echo(f"-- raw history: {out['history_size']} bytes")


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
@click.option("--since", default="7d", show_default=True, help="Window: e.g. 24h, 7d, 30d (or seconds).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(since: str, as_json: bool) -> None:
    """Jobs by outcome, completion rate, rollbacks, stalls, timeouts, rate limits, runners and models,
    tokens and cost, p50/p95 duration and queue wait, and the executor's footprint against its budget."""
    from datetime import timedelta

    from .report import build_report, read_footprint, render_text
    from .settings import parse_duration

    settings = _settings()
    try:
        window = timedelta(seconds=parse_duration(since))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if window.total_seconds() <= 0:
        raise click.ClickException("--since must be longer than zero")
    store = _store(settings)
    footprint = read_footprint(settings.status_path, fresh=max(10.0, 5 * settings.poll_interval))
    view = build_report(store, window, footprint=footprint)
    click.echo(json.dumps(view, indent=2) if as_json else render_text(view))


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


@main.command()
@click.option("--max-age", default=30.0, show_default=True, type=float,
              help="Seconds since the main loop's last tick beyond which the executor is unhealthy.")
def health(max_age: float) -> None:
    """Exit 0 if the serving loop ticked within --max-age seconds (the container health check), else 1."""
    settings = _settings()
    try:
        ts = float(json.loads(settings.status_path.read_text())["ts"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        click.echo(f"unhealthy: no readable {settings.status_path} ({exc.__class__.__name__})", err=True)
        sys.exit(1)
    age = time.time() - ts
    if age > max_age:
        click.echo(f"unhealthy: the main loop last ticked {age:.0f}s ago (limit {max_age:g}s)", err=True)
        sys.exit(1)
    click.echo(f"healthy: last tick {age:.1f}s ago")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Check what commonly goes wrong on a new server, and say how to fix each; exit 1 on a problem."""
    from . import doctor as checks

    results = checks.run(_settings(), os.environ)
    failed = any(c.status == "problem" for c in results)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": checks.as_dicts(results)}, indent=2))
    else:
        click.echo(checks.render(results))
    sys.exit(1 if failed else 0)


# --------------------------------------------------------------------------------------------- review


@main.group()
def review() -> None:
    """Jobs whose tests passed and that wait for a person: list, show, approve, reject."""


def _review_call(fn, *args, **kwargs):
    from .errors import Conflict, ReviewError

    try:
        return fn(*args, **kwargs)
    except Conflict as exc:
        click.echo("conflict: nothing was applied; changed in the repository since the job started:", err=True)
        for path in exc.paths:
            click.echo(f"  {path}", err=True)
        raise click.ClickException(str(exc)) from None
    except ReviewError as exc:
        raise click.ClickException(str(exc)) from None


@review.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def review_list(as_json: bool) -> None:
    """The review queue, the longest waiting first."""
    from . import review as rv

    store = _store(_settings())
    rows = [{"id": j.id, "session_id": j.session_id, "runner": j.runner, "workspace": j.workspace,
             "since": j.review_since.isoformat() if j.review_since else None,
             "waiting_seconds": round(rv.since(j.review_since) or 0, 1),
             "reasons": j.review_reasons, "changed_files": j.changed_files} for j in rv.queue(store)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no job awaits review")
    for r in rows:
        click.echo(f"{r['id']:20} waiting {r['waiting_seconds']:>8.0f}s  {len(r['changed_files'])} files  "
                   f"{rv.reason_text(r['reasons'])}")


@review.command(name="show")
@click.argument("job_id")
def review_show(job_id: str) -> None:
    """Everything a reviewer needs: reasons, the agent's final message, tests, and a diff of every changed
    file against the repository as it is now."""
    from . import review as rv

    settings = _settings()
    store = _store(settings)
    current = _job(store, job_id)
    if current.status != Status.awaiting_review:
        raise click.ClickException(f"job {job_id} is {current.status.value}, not awaiting review")
    item = _review_call(rv.pending, store, settings, job_id)
    job = item.job
    click.echo(f"job        {job.id} ({job.status.value})")
    click.echo(f"workspace  {job.workspace}")
    click.echo(f"runner     {job.runner} ({job.model_requested})")
    if job.review_since:
        click.echo(f"waiting    since {job.review_since:%Y-%m-%d %H:%M:%S}Z")
    click.echo("reasons:")
    for r in item.reasons:
        click.echo(f"  - {r.get('message', r) if isinstance(r, dict) else r}")
    click.echo("final message:")
    for line in (job.final_text or "(none)").splitlines():
        click.echo(f"  | {line}")
    click.echo(f"tests: {job.test_command or 'true'} -> exit {job.test_exit_code}")
    for line in (job.test_output or "").splitlines()[-30:]:
        click.echo(f"  | {line}")
    if item.missing:
        click.echo("the kept change is gone: only reject makes sense")
        return
    if item.refused:
        click.echo(f"never applied: {', '.join(item.refused)}")
    click.echo(f"change: {len(item.diffs)} paths, {item.changed_lines} changed lines")
    click.echo(rv.render_unified(item.diffs), nl=False)


@review.command(name="approve")
@click.argument("job_id")
@click.argument("more", nargs=-1)
@click.option("--files", "files", multiple=True, metavar="PATH...",
              help="Apply only these changed paths (a directory: everything changed below it).")
@click.option("--note", default=None, help="Recorded with the decision.")
def review_approve(job_id: str, more: tuple[str, ...], files: tuple[str, ...], note: str | None) -> None:
    """Apply the job's change exactly as tested (or only --files PATH...), with the pipeline's conflict check."""
    from . import review as rv

    if more and not files:
        raise click.UsageError(f"unexpected arguments {' '.join(more)}: paths go after --files")
    settings = _settings()
    store = _store(settings)
    job = _review_call(rv.approve, store, settings, job_id, [*files, *more] or None, note)
    click.echo(f"{job.id} {job.status.value}: applied {len(job.changed_files)} paths")
    for path in job.changed_files:
        click.echo(f"  {path}")


@review.command(name="reject")
@click.argument("job_id")
@click.option("--note", default=None, help="Recorded with the decision.")
def review_reject(job_id: str, note: str | None) -> None:
    """Discard the job's change; the repository is not touched."""
    from . import review as rv

    settings = _settings()
    store = _store(settings)
    job = _review_call(rv.reject, store, settings, job_id, note)
    click.echo(f"{job.id} {job.status.value}: {job.error}")


if __name__ == "__main__":
    sys.exit(main())
