"""The ``executor`` command: serve, submit, and look at jobs.

Owns argument parsing and printing. Configuration comes from one ``Settings`` object built here from the
environment (pydantic-settings); ``os.environ`` is handed to the executor as the source of runner
credentials (looked up by the names in ``runners.toml``), and to ``doctor``, which checks they are set.
``status`` and ``health`` read the serving loop's snapshot and take only its place (``EXECUTOR_HOME``) from
the environment, so that they answer without loading pydantic-settings (``cli_common.state_root``).

Must never: change a job's status itself (it asks the store, which refuses illegal moves), or print a
credential.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import click

# Each command imports what it needs when it runs: `executor status` must answer in a blink, without
# loading the database layer, the Docker client or the web stack.
from ..errors import ExecutorError, InvalidJob
from ..scheduling import snapshot as status_file
from ..store import Status
from .cli_common import get_job, job_view, load_settings, open_store, state_root
from .cli_db import db
from .cli_review import review
from .cli_session import session


@click.group()
def main() -> None:
    """Run Claude Code jobs in containers on overlay workspaces; commit only what passed its tests."""


@main.command()
def serve() -> None:
    """Run the executor until SIGTERM or SIGINT, then stop cleanly (running jobs are re-queued)."""
    from .. import logs
    from ..scheduling.service import Executor

    settings = load_settings()
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
    from ..intake.jobs import parse_spec, validate
    from ..intake.spool import Spool

    settings = load_settings()
    raw = file.read()
    try:
        spec = parse_spec(raw)
        valid = validate(spec, settings)
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    if (settings.database_url is not None or settings.db_path.exists()) and \
            open_store(settings).get(valid.id) is not None:
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
    store = open_store(load_settings())
    view = job_view(store, get_job(store, job_id))
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    for key in ("id", "session_id", "status", "reason", "error", "runner", "model_requested", "models_seen",
                "workspace", "host", "interrupted_at", "policy", "created_at", "started_at", "finished_at", "skills",
                "context", "compaction"):
        if view[key] not in (None, [], ""):
            click.echo(f"{key:16} {view[key]}")
    click.echo(f"{'attempts':16} {len(view['attempts'])}")
    for a in view["attempts"]:
        click.echo(f"  {a['number']:>3} host {a['host'] or '-':16} {a['outcome'] or 'running'}"
                   f"  {a['started_at'][:19]}Z")
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
@click.option("--host", "host", default=None, help="Only the jobs this host claimed.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=0),
              help="At most this many, in admission order (0: all).")
@click.option("--json", "as_json", is_flag=True)
def jobs(statuses: tuple[str, ...], host: str | None, limit: int, as_json: bool) -> None:
    """List jobs (optionally of some statuses, or of one host), in admission order."""
    store = open_store(load_settings())
    rows = store.job_list([Status(s) for s in statuses] if statuses else None, host=host, limit=limit or None)
    if as_json:
        click.echo(json.dumps([{"id": j.id, "status": j.status.value, "runner": j.runner, "host": j.host_id,
                                "session_id": j.session_id, "reason": j.reason,
                                "created_at": j.created_at.isoformat()} for j in rows], indent=2))
        return
    for j in rows:
        click.echo(f"{j.id:20} {j.status.value:12} {j.runner:12} {j.host_id or '-':12} {j.reason or ''}")
    if limit and len(rows) == limit:
        click.echo(f"(the first {limit}; --limit 0 lists all)", err=True)


@main.command(name="log")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def log_cmd(job_id: str, as_json: bool) -> None:
    """The job's event log: turns, tool calls, file edits, shell commands, results, state changes."""
    from ..agent.describe import clipped

    store = open_store(load_settings())
    get_job(store, job_id)
    for e in store.events(job_id=job_id):
        if as_json:
            click.echo(json.dumps({"ts": e.ts.isoformat(), "attempt": e.attempt, "kind": e.kind, "data": e.data}))
        else:
            click.echo(f"{e.ts:%H:%M:%S} a{e.attempt} {e.kind:12} {clipped(e.kind, e.data, 300)}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Budget, reservations, measured use, running jobs, the queue and why its head waits."""
    view = _status_view()
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    _print_status(view)


def _fresh(snapshot: dict | None) -> bool:
    if not snapshot:
        return False
    return snapshot["age_seconds"] < max(10.0, 5 * float(snapshot.get("poll_interval") or 0.5))


def _status_view() -> dict[str, Any]:
    """From the serving loop's snapshot alone while it runs; from the settings and the store when it does not."""
    home = state_root()
    snapshot = status_file.read(home / "status.json")
    if not _fresh(snapshot):
        settings = load_settings()
        snapshot = status_file.read(settings.status_path)
        if not _fresh(snapshot):
            return _idle_view(settings, snapshot)
    disk = snapshot["measured"].get("disk") or {}
    counts = snapshot.get("counts") or {}
    return {
        "executor": "running", "host": snapshot.get("host"), "hosts": snapshot.get("hosts", []),
        "status_age_seconds": snapshot["age_seconds"], "budget": snapshot["budget"],
        "reserved": snapshot.get("reserved"), "measured": snapshot.get("measured"),
        "running": snapshot.get("running", []), "queue_length": counts.get(Status.queued.value, 0),
        "waiting": snapshot.get("waiting"), "runners": snapshot.get("runners", []), "counts": counts,
        "disk": {"state_root": str(home), "free": disk.get("state_root_free"), "reserve": disk.get("reserve"),
                 "jobs": disk.get("jobs", 0)},
    }


def _idle_view(settings, snapshot: dict | None) -> dict[str, Any]:
    from ..sandbox.disk import free_bytes
    from ..scheduling.hosting import hosts_view

    store = open_store(settings)
    counts = {st.value: n for st, n in store.counts().items()}
    return {
        "executor": "not running", "host": settings.host_id, "hosts": hosts_view(store, settings.host_timeout),
        "status_age_seconds": snapshot["age_seconds"] if snapshot else None,
        "budget": {"cpus": settings.budget_cpus, "memory": settings.budget_memory,
                   "reserve_memory": settings.reserve_memory},
        "reserved": None, "measured": None, "running": [], "queue_length": counts.get(Status.queued.value, 0),
        "waiting": None, "runners": [], "counts": counts,
        "disk": {"state_root": str(settings.home), "free": free_bytes(settings.home),
                 "reserve": settings.disk_reserve, "jobs": 0},
    }


def _print_status(view: dict[str, Any]) -> None:
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
    disk = view["disk"]
    click.echo(f"disk       jobs wrote {mib(disk['jobs'])}; {mib(disk['free'])} free under {disk['state_root']} "
               f"(reserve {mib(disk['reserve'])})")
    for r in view["running"]:
        click.echo(f"  {r['job']:20} {r['runner']:12} {r['cpus']:g} cpus {mib(r['memory'])}  "
                   f"disk {mib(r.get('disk_used'))} of {mib(r.get('disk_limit'))}  "
                   f"state={r['state']} idle={r['idle_for']} {r['last_activity'] or ''}")
    for r in view["runners"]:
        click.echo(f"runner     {r['runner']:12} {r['state']}; {r['running']} running, {r['waiting']} waiting")
    for h in view.get("hosts") or []:
        here = " (this host)" if h["host"] == view.get("host") else ""
        click.echo(f"host       {h['host']:16} {h['state']:7} last seen {h['last_seen_seconds']:g}s ago; "
                   f"{h['running']} running; {h['reserved']['cpus']:g} of {h['budget']['cpus']:g} cpus, "
                   f"{mib(h['reserved']['memory'])} of {mib(h['budget']['memory'])}{here}"
                   + (f"; {h['waiting']}" if h.get("waiting") else ""))


@main.command()
@click.option("--since", default="7d", show_default=True, help="Window: e.g. 24h, 7d, 30d (or seconds).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def report(since: str, as_json: bool) -> None:
    """Jobs by outcome, completion rate, rollbacks, stalls, timeouts, rate limits, runners and models,
    tokens and cost, p50/p95 duration and queue wait, and the executor's footprint against its budget."""
    from datetime import timedelta

    from ..settings import parse_duration
    from .report import build_report, read_footprint, render_text

    settings = load_settings()
    try:
        window = timedelta(seconds=parse_duration(since))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if window.total_seconds() <= 0:
        raise click.ClickException("--since must be longer than zero")
    from ..scheduling.hosting import hosts_view

    store = open_store(settings)
    footprint = read_footprint(settings.status_path, fresh=max(10.0, 5 * settings.poll_interval))
    view = build_report(store, window, footprint=footprint, hosts=hosts_view(store, settings.host_timeout))
    click.echo(json.dumps(view, indent=2) if as_json else render_text(view))


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its supervisor notices (about 1 s)."""
    store = open_store(load_settings())
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
    path = state_root() / "status.json"
    snapshot = status_file.read(path)
    if snapshot is None:
        click.echo(f"unhealthy: no readable {path}", err=True)
        sys.exit(1)
    age = snapshot["age_seconds"]
    if age > max_age:
        click.echo(f"unhealthy: the main loop last ticked {age:.0f}s ago (limit {max_age:g}s)", err=True)
        sys.exit(1)
    click.echo(f"healthy: last tick {age:.1f}s ago")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Check what commonly goes wrong on a new server, and say how to fix each; exit 1 on a problem."""
    from . import doctor as checks

    results = checks.run(load_settings(), os.environ)
    failed = any(c.status == "problem" for c in results)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "checks": checks.as_dicts(results)}, indent=2))
    else:
        click.echo(checks.render(results))
    sys.exit(1 if failed else 0)


main.add_command(db)
main.add_command(review)
main.add_command(session)


if __name__ == "__main__":
    sys.exit(main())
