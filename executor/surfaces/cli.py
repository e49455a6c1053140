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
from pathlib import Path
from typing import Any

import click

# Each command imports what it needs when it runs: `executor status` must answer in a blink, without
# loading the database layer, the Docker client or the web stack.
from ..errors import ExecutorError, InvalidJob
from ..scheduling import snapshot as status_file
from ..store import Status
from .cli_common import get_job, load_settings, open_store, read_only, state_root
from .cli_db import db
from .cli_jobs import cancel, complete_job_id, follow_events, jobs, log_cmd, show
from .cli_ops import backup, prune
from .cli_review import land, review
from .cli_session import session


def _asked_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version`` (eager): noted here, printed once ``--json`` (wherever it stands) is known."""
    if value:
        ctx.meta["executor.version"] = True


def _print_version(ctx: click.Context, _param: click.Parameter, as_json: bool) -> None:
    """Print the version (as JSON with ``--json``) and exit, when ``--version`` was given."""
    if not ctx.meta.get("executor.version"):
        return
    from importlib.metadata import version

    number = version("executor")
    click.echo(json.dumps({"version": number}) if as_json else f"executor, version {number}")
    ctx.exit(0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=_asked_version,
              help="Show the version and exit.")
@click.option("--json", is_flag=True, expose_value=False, callback=_print_version,
              help="With --version: print it as JSON.")
def main() -> None:
    """Run Claude Code jobs in containers on overlay workspaces; commit only what passed its tests."""


@main.command()
def serve() -> None:
    """Run the executor until SIGTERM or SIGINT, then stop cleanly (running jobs are re-queued)."""
    from .. import logs
    from ..scheduling.service import Executor

    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    _note_history(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        Executor(settings, os.environ).serve(stop)
    except ExecutorError as exc:
        raise click.ClickException(str(exc)) from None


def _note_history(settings) -> None:
    """Say at start when the PostgreSQL store in use holds no job while the state root's SQLite file does."""
    import logging

    from .cli_db import HISTORY_FIX, history_left_behind

    left = history_left_behind(settings)
    if left:
        logging.getLogger("executor.store").warning(
            "this PostgreSQL store starts an empty history: the SQLite store in the state root holds jobs it does "
            "not", extra={"action": "store_history", "sqlite": str(settings.db_path), "jobs": left,
                          "fix": HISTORY_FIX})


@main.command()
@click.argument("file", type=click.File("rb"))
@click.option("--wait", is_flag=True, help="Follow the job to its end; exit 0 only if it succeeded.")
@click.option("--json", "as_json", is_flag=True, help="Print the id (and with --wait the ending) as JSON.")
def submit(file: Any, wait: bool, as_json: bool) -> None:
    """Validate a job file (or - for stdin) against the serving executor's own settings and put it into its
    spool; prints the job id. Refuses when no executor serves the state root (EXECUTOR_HOME)."""
    daemon, translate = _serving_settings()
    _spool(daemon, file.read(), wait, as_json, translate)


@main.command()
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--wait", is_flag=True, help="Follow the new job to its end; exit 0 only if it succeeded.")
@click.option("--json", "as_json", is_flag=True, help="Print the new job's id (and with --wait its ending) as JSON.")
def retry(job_id: str, wait: bool, as_json: bool) -> None:
    """Run a failed, rolled back, stalled or cancelled job's task again: a new job of the same session (it
    starts from the session's brief, which says how this one ended), submitted like a job file, so it is
    judged by the runner, the policy and the workspace as they are now. Prints the new job's id."""
    from ..intake.followup import retry_spec

    daemon, translate = _serving_settings()
    try:
        spec = retry_spec(get_job(open_store(daemon), job_id))
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    _spool(daemon, json.dumps(spec).encode(), wait, as_json, translate)


def _serving_settings():
    """The serving executor's settings, its paths as this process sees them, and how a job file's workspace
    is to be read here (a host path inside the executor's container, a container path on the host: the
    serving loop's intake reads both); refuses when none serves."""
    from ..sandbox.hostpaths import HostPaths
    from ..settings import Settings

    home = state_root()
    snapshot = status_file.read(home / "status.json")
    if not _fresh(snapshot) or "settings" not in snapshot:
        raise click.ClickException(
            f"no executor serves the state root {home} (no fresh {home / 'status.json'}): start `executor serve` "
            "(or `docker compose up -d`, then submit with `docker compose exec -T executor executor submit -`), "
            "or set EXECUTOR_HOME to the state root it serves")
    paths = HostPaths(tuple(tuple(pair) for pair in snapshot.get("host_paths") or []))
    beside = Path(snapshot["settings"]["home"]) == home  # in its container (or both on the host)
    # judged as the executor that will run it would judge it
    return Settings(**_as_seen_here(snapshot, home)), paths.to_container if beside else paths.to_host


def _spool(daemon, raw: bytes, wait: bool, as_json: bool, translate) -> None:
    """Validate a job file as ``daemon`` would and put it into its spool; print the id (or follow the job).
    ``translate``: the workspace as a path ``daemon`` sees (the file keeps what the person wrote: the serving
    loop's intake translates it in the same way)."""
    from ..intake.jobs import parse_spec, validate
    from ..intake.spool import Spool

    try:
        spec = parse_spec(raw)
        valid = validate(spec.model_copy(update={"workspace": translate(spec.workspace)}), daemon)
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    # The shared store, when EXECUTOR_DATABASE_URL names one here too (status.json never holds its URL).
    if daemon.store_exists and open_store(daemon).get(valid.id) is not None:
        raise click.ClickException(f"a job with id {valid.id!r} already exists; job ids are unique")
    data = json.loads(raw)
    data["id"] = valid.id  # fix the id now, so the person gets it and a re-read cannot change it
    Spool(daemon.spool_dir).write(json.dumps(data, indent=2).encode() + b"\n")
    if not wait:
        click.echo(json.dumps({"id": valid.id}) if as_json else valid.id)
        return
    job = follow_events(daemon, valid.id, quiet=as_json)
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, "reason": job.reason, "error": job.error}))
    sys.exit(0 if job.status == Status.succeeded else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Budget, reservations, measured use, running jobs, the queue and why its head waits."""
    view = _status_view()
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    _print_status(view)


def _as_seen_here(snapshot: dict, home: Path) -> dict:
    """The serving executor's settings, with its paths as this process sees them: the same ones when it runs
    beside us, the host paths of its container's mounts when we are on the host and it in a container."""
    from ..sandbox.hostpaths import HostPaths

    settings = dict(snapshot["settings"])
    if Path(settings["home"]) == home:
        return settings
    paths = HostPaths(tuple(tuple(pair) for pair in snapshot.get("host_paths") or []))
    settings["home"] = str(home)
    settings["policies"] = paths.to_host(settings["policies"])
    settings["workspace_roots"] = [paths.to_host(r) for r in settings["workspace_roots"]]
    return settings


#: Free bytes under the state root below which it counts as full (a status file no longer fits).
FULL_BELOW = 1 << 20


def _fresh(snapshot: dict | None) -> bool:
    if not snapshot:
        return False
    return snapshot["age_seconds"] < max(10.0, 5 * float(snapshot.get("poll_interval") or 0.5))


def _status_view() -> dict[str, Any]:
    """From the serving loop's snapshot alone while it runs; from the database (read-only) when it does not."""
    home = state_root()
    snapshot = status_file.read(home / "status.json")
    if not _fresh(snapshot):
        return _idle_view(home, snapshot)
    disk = snapshot["measured"].get("disk") or {}
    counts = snapshot.get("counts") or {}
    return {
        "executor": "running", "host": snapshot.get("host"), "hosts": snapshot.get("hosts", []),
        "status_age_seconds": snapshot["age_seconds"], "budget": snapshot["budget"],
        "reserved": snapshot.get("reserved"), "measured": snapshot.get("measured"),
        "running": snapshot.get("running", []), "queue_length": counts.get(Status.queued.value, 0),
        "waiting": snapshot.get("waiting"), "runners": snapshot.get("runners", []), "counts": counts,
        "problems": snapshot.get("problems", []),
        # The machine: the container engine, the store, the jobs held until they can be settled.
        "engine": snapshot.get("engine"), "store": snapshot.get("store"), "unsettled": snapshot.get("unsettled", []),
        "disk": {"state_root": str(home), "free": disk.get("state_root_free"), "reserve": disk.get("reserve"),
                 "jobs": disk.get("jobs", 0), "cap": disk.get("cap")},
    }


def _idle_view(home: Path, snapshot: dict | None) -> dict[str, Any]:
    """No executor serves the state root: the counts from the database, the budget from its last snapshot (or,
    when it never ran here, from the settings)."""
    from ..sandbox.disk import free_bytes
    from ..store import reads

    with read_only() as conn:
        counts = reads.counts(conn)
        hosts = reads.hosts(conn)
    if snapshot is not None:
        budget, reserve = snapshot["budget"], (snapshot["measured"].get("disk") or {}).get("reserve")
    else:
        settings = load_settings()
        budget = {"cpus": settings.budget_cpus, "memory": settings.budget_memory,
                  "reserve_memory": settings.reserve_memory}
        reserve = settings.disk_reserve
    free = free_bytes(home)
    # A full state root also stops the serving loop's status file: say so rather than only "not running".
    full = [f"the state root's file system is full ({free} bytes free under {home}): a serving executor cannot "
            "write its status and starts no job; free space there"] if free < FULL_BELOW else []
    return {
        "executor": "not running", "host": (snapshot or {}).get("host"), "hosts": hosts,
        "status_age_seconds": snapshot["age_seconds"] if snapshot else None,
        "budget": budget, "reserved": None, "measured": None, "running": [],
        "queue_length": counts.get(Status.queued.value, 0), "waiting": None, "runners": [], "counts": counts,
        "problems": full, "engine": None, "store": None, "unsettled": [],
        "disk": {"state_root": str(home), "free": free, "reserve": reserve, "jobs": 0},
    }


def _print_status(view: dict[str, Any]) -> None:
    mib = lambda n: f"{(n or 0) / 2**20:.0f} MiB"  # noqa: E731
    budget = view["budget"]
    problems = view.get("problems") or []
    click.echo(f"executor   {view['executor']}" + (" with problems" if problems else ""))
    for problem in problems:
        click.echo(f"problem    {problem}")
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
    cap = f"; each job's cap held by {'its disk image' if disk['cap'] == 'image' else 'the watchdog'}" \
        if disk.get("cap") else ""
    click.echo(f"disk       jobs wrote {mib(disk['jobs'])}; {mib(disk['free'])} free under {disk['state_root']} "
               f"(reserve {mib(disk['reserve'])}){cap}")
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
@click.option("--max-age", default=30.0, show_default=True, type=float,
              help="Seconds since the main loop's last tick beyond which the executor is unhealthy.")
@click.option("--json", "as_json", is_flag=True)
def health(max_age: float, as_json: bool) -> None:
    """Exit 0 if the serving loop ticked within --max-age seconds (the container health check), else 1."""
    path = state_root() / "status.json"
    snapshot = status_file.read(path)
    age = snapshot["age_seconds"] if snapshot else None
    healthy = age is not None and age <= max_age
    if as_json:
        click.echo(json.dumps({"healthy": healthy, "last_tick_seconds_ago": age, "max_age": max_age}))
    elif age is None:
        click.echo(f"unhealthy: no readable {path}", err=True)
    elif not healthy:
        click.echo(f"unhealthy: the main loop last ticked {age:.0f}s ago (limit {max_age:g}s)", err=True)
    else:
        click.echo(f"healthy: last tick {age:.1f}s ago")
    sys.exit(0 if healthy else 1)


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


for command in (db, review, land, session, show, jobs, log_cmd, cancel, retry, backup, prune):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
