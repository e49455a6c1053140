"""``executor show``, ``jobs``, ``log`` and ``cancel``: looking at jobs, and stopping one, from the command line.

Owns these commands' arguments and printing: a table with headers, ages and durations for ``jobs`` (newest
first, filtered, limited), colour only on a terminal (click drops it otherwise), ``--json`` everywhere, job
ids completed by the shell (``_EXECUTOR_COMPLETE=bash_source executor``), and following a job's log as it
grows.

Must never: change a job's status itself (``cancel`` asks the store, which refuses illegal moves).
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime

import click
from click.shell_completion import CompletionItem

from ..clock import aware, span, utcnow
from ..errors import InvalidJob
from ..store import TERMINAL, Status
from ..store.status import attempt_text
from .cli_common import evaluation_lines, get_job, job_view, load_settings, open_store, read_only, state_root
from .git_view import git_line
from .seal_view import SEAL_EVENTS, denial_line

COLOURS = {"succeeded": "green", "failed": "red", "rolled_back": "yellow", "stalled": "magenta",
           "cancelled": "bright_black", "rejected": "red", "awaiting_review": "cyan", "running": "blue",
           "testing": "blue", "committing": "blue"}


def complete_job_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The shell's completion of a job id: the most recent jobs whose id starts with what was typed."""
    from ..store import reads

    try:
        with read_only() as conn:
            rows = reads.recent_jobs(conn, limit=200)
    except click.ClickException:
        return []
    return [CompletionItem(j.id, help=j.status.value) for j in rows if j.id.startswith(incomplete)]


def _ago(moment: datetime | None, now: datetime) -> str:
    return "" if moment is None else span((now - aware(moment)).total_seconds())


def _duration(job, now: datetime) -> float | None:
    if job.started_at is None:
        return None
    end = aware(job.finished_at) if job.finished_at else now
    return (end - aware(job.started_at)).total_seconds()


@click.command()
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(job_id: str, as_json: bool) -> None:
    """One job: status, why, models, attempts, network and egress denials, API requests, where its change landed
    in git (the commit, or its branch), changed files, tests (and the evaluation gate's tests by name)."""
    from ..store import reads

    with read_only() as conn:
        job = reads.job(conn, job_id)
        if job is None:
            raise click.ClickException(f"no job {job_id!r}")
        view = job_view(job, reads.attempts(conn, job_id), reads.events(conn, job_id, SEAL_EVENTS),
                        reads.api_requests(conn, job_id), reads.followers(conn, job_id), _why_waiting(job))
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    for key in ("id", "session_id", "status", "waiting", "reason", "error", "runner", "agent", "model_requested",
                "models_seen", "workspace", "host", "interrupted_at", "policy", "follows", "builds_on", "followed_by",
                "created_at", "started_at", "finished_at", "skills", "context", "compaction"):
        if view[key] not in (None, [], ""):
            value = click.style(view[key], fg=COLOURS.get(view[key])) if key == "status" else view[key]
            click.echo(f"{key:16} {value}")
    click.echo(f"{'attempts':16} {len(view['attempts'])}")
    for a in view["attempts"]:
        agent = f"agent {a['outcome']}" + (f", exit {a['exit_code']}" if a["exit_code"] is not None else "") \
            if a["outcome"] else ""
        click.echo(f"  {a['number']:>3} on {a['host'] or '-':16} {attempt_text(a['status'], a['reason']):28} "
                   f"{agent:26} {a['started_at'][:19]}Z")
    _show_seal(view)
    if (line := git_line(getattr(job, "git", None), job.id)) is not None:
        click.echo(f"{'git':16} {line}")
        if view["git"]["note"]:
            click.echo(f"{'':16} {view['git']['note']}")
    if view["changed_files"]:
        click.echo("changed files:")
        for path in view["changed_files"]:
            click.echo(f"  {path}")
    tests = view["tests"]
    if tests["exit_code"] is not None:
        click.echo(f"tests: {tests['command']} -> exit {tests['exit_code']}")
        for line in (tests["output_tail"] or "").splitlines()[-15:]:
            click.echo(f"  | {line}")
    for line in evaluation_lines(view["evaluation"]):
        click.echo(line)



def _why_waiting(job) -> str | None:
    """Why a queued job has not started, as the serving loop said at its last tick (None when it runs or
    ended, or no executor serves)."""
    if job.status not in (Status.queued, Status.waiting_retry):
        return None
    from ..scheduling import snapshot

    current = snapshot.read(state_root() / "status.json")
    return (current or {}).get("held", {}).get(job.id)

def _show_seal(view: dict) -> None:
    network, api = view["network"], view["api"]
    if network["unsealed"]:
        click.echo(f"{'network':16} {click.style(network['warning'], fg='red')}")
    else:
        allowed = f"; egress {', '.join(network.get('egress') or []) or 'none'}" if network["sealed"] else ""
        click.echo(f"{'network':16} {network['network']}{allowed}")
    if api["requests"]:
        statuses = ", ".join(f"{n}x {status}" for status, n in api["statuses"].items())
        click.echo(f"{'api requests':16} {api['requests']} ({statuses}); {api['input_tokens']} input, "
                   f"{api['output_tokens']} output, {api['cache_read_input_tokens']} cache-read tokens (from the API)")
    for refused in api["refused"]:
        times = f" ({refused['count']} times)" if refused.get("count", 1) > 1 else ""
        click.echo(f"{'api refused':16} {refused.get('method')} {refused.get('path')}: {refused.get('reason')}{times}")
    if api.get("unrecorded"):
        counted = ", ".join(f"{n} {kind}" for kind, n in api["unrecorded"].items())
        click.echo(f"{'not recorded':16} past the event cap (EXECUTOR_SEALED_EVENT_CAP), counted only: {counted}")
    if view["egress_denied"]:
        click.echo(f"egress denied ({sum(d.get('count', 1) for d in view['egress_denied'])}):")
        for denial in view["egress_denied"]:
            click.echo(f"  {denial_line(denial)}")


@click.command()
@click.option("--status", "statuses", multiple=True, type=click.Choice([s.value for s in Status]),
              help="Only jobs in this status (repeat for several).")
@click.option("--runner", default=None, help="Only jobs of this runner.")
@click.option("--session", "session_id", default=None, help="Only jobs of this session.")
@click.option("--host", default=None, help="Only jobs this host claimed (several hosts sharing one store).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1), help="At most this many.")
@click.option("--json", "as_json", is_flag=True)
def jobs(statuses: tuple[str, ...], runner: str | None, session_id: str | None, host: str | None, limit: int,
         as_json: bool) -> None:
    """The most recent jobs, newest first: status, runner, host, age, how long they ran, why they ended."""
    from ..store import reads

    with read_only() as conn:
        rows = reads.recent_jobs(conn, [Status(s) for s in statuses] or None, runner=runner, session_id=session_id,
                                 limit=limit, host=host)
    now = utcnow()
    if as_json:
        click.echo(json.dumps([{"id": j.id, "status": j.status.value, "runner": j.runner, "host": j.host_id,
                                "session_id": j.session_id,
                                "reason": j.reason, "created_at": aware(j.created_at).isoformat(),
                                "age_seconds": round((now - aware(j.created_at)).total_seconds(), 1),
                                "duration_seconds": None if (d := _duration(j, now)) is None else round(d, 1)}
                               for j in rows], indent=2))
        return
    header = f"{'ID':24} {'STATUS':16} {'RUNNER':12} {'HOST':12} {'AGE':>7} {'RAN':>7}  REASON"
    click.echo(header)
    for j in rows:
        status = click.style(f"{j.status.value:16}", fg=COLOURS.get(j.status.value))
        click.echo(f"{j.id:24} {status} {j.runner[:12]:12} {(j.host_id or '-')[:12]:12} {_ago(j.created_at, now):>7} "
                   f"{span(_duration(j, now)):>7}  {j.reason or ''}")


@click.command(name="log")
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--json", "as_json", is_flag=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing events as they arrive until the job settles.")
def log_cmd(job_id: str, as_json: bool, follow: bool) -> None:
    """The job's event log: turns, tool calls, file edits, shell commands, results, state changes."""
    settings = load_settings()
    store = open_store(settings)
    get_job(store, job_id)
    job = follow_events(settings, job_id, as_json=as_json, once=not follow, store=store)
    if follow:
        sys.exit(0 if job.status == Status.succeeded else 1)


def follow_events(settings, job_id: str, quiet: bool = False, as_json: bool = False, once: bool = False,
                  store=None):
    """Print the job's events (as they arrive, until it settles or waits for a person; ``once``: those there
    are now); returns the job. ``store``: one already open (else it is opened once there is one)."""
    from ..agent.describe import clipped

    last = 0
    while True:
        if store is None and settings.store_exists:
            store = open_store(settings)
        job = store.get(job_id) if store is not None else None
        if job is not None:
            for e in store.events(job_id=job_id, after=last):
                last = e.id
                if quiet:
                    continue
                if as_json:
                    click.echo(json.dumps({"ts": e.ts.isoformat(), "attempt": e.attempt, "kind": e.kind,
                                           "data": e.data}))
                else:
                    click.echo(f"{e.ts:%H:%M:%S} a{e.attempt} {e.kind:12} {clipped(e.kind, e.data, 300)}")
            if once:
                return job
            if job.status.terminal or job.status == Status.awaiting_review:
                if not quiet and not as_json:
                    ending = f" ({job.reason}): {job.error}" if job.reason and job.status != Status.succeeded else ""
                    click.echo(f"{job.id} {click.style(job.status.value, fg=COLOURS.get(job.status.value))}{ending}")
                return job
        time.sleep(0.5)


@click.command()
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--json", "as_json", is_flag=True)
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one at once, a running one as soon as its supervisor notices (about 1 s).
    A job that has already ended is left as it is, and the command says so and exits 1."""
    store = open_store(load_settings())
    before = get_job(store, job_id)
    if before.status in TERMINAL:
        if as_json:
            click.echo(json.dumps({"id": before.id, "status": before.status.value, "cancelled": False}))
        raise click.ClickException(f"job {before.id} already ended ({before.status.value}): nothing to cancel")
    try:
        job = store.request_cancel(job_id)
    except InvalidJob as exc:
        raise click.ClickException(str(exc)) from None
    done = job.status == Status.cancelled
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, "cancelled": done,
                               "cancel_requested": job.cancel_requested}))
    elif done:
        click.echo(f"{job.id} cancelled")
    else:
        click.echo(f"{job.id} cancel requested ({job.status.value})")

