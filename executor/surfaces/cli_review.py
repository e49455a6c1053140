"""``executor review``: the review queue from the command line (list, show, approve, reject, request-changes),
and ``executor land``: a branch job's commit brought into the working tree.

Owns these commands' arguments and printing; the decisions are ``review/decisions.py``'s, the landing
``review/land.py``'s.

Must never: decide anything itself.
"""

from __future__ import annotations

import getpass
import json
import os

import click

from ..errors import Conflict, ReviewError
from ..store import Status
from .cli_common import evaluation_lines, get_job, load_settings, open_store
from .cli_jobs import complete_job_id


@click.group()
def review() -> None:
    """Jobs whose tests passed and that wait for a person: list, show, approve, reject, request-changes."""


def _review_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Conflict as exc:
        click.echo("conflict: nothing was applied; changed in the repository since the job started:", err=True)
        for path in exc.paths:
            click.echo(f"  {path}", err=True)
        raise click.ClickException(str(exc)) from None
    except ReviewError as exc:
        raise click.ClickException(str(exc)) from None


def reviewer() -> str:
    """Who decides from the command line, and with what credential: the person (behind sudo when there is
    one) and the local account this process runs as (access to the state root is the credential)."""
    name = os.environ.get("SUDO_USER")
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = f"uid {os.getuid()}"
    return f"{name} with the command line (uid {os.getuid()})"


@review.command(name="url")
@click.option("--json", "as_json", is_flag=True)
def review_url(as_json: bool) -> None:
    """The review page's address with its token (open it once in a browser: a cookie keeps the token)."""
    from .web.access import page_token, web_url

    settings = load_settings()
    base = web_url(settings)
    if base is None:
        raise click.ClickException("the review page is off: set EXECUTOR_UI_PORT (and restart `executor serve`)")
    url = f"{base}/?token={page_token(settings)}"
    click.echo(json.dumps({"url": url}) if as_json else url)


@review.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def review_list(as_json: bool) -> None:
    """The review queue, the longest waiting first."""
    from .. import review as rv

    store = open_store(load_settings())
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
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--json", "as_json", is_flag=True)
def review_show(job_id: str, as_json: bool) -> None:
    """Everything a reviewer needs: reasons, the agent's final message, tests (the evaluation gate's by name),
    and a diff of every changed file against the repository as it is now. For a decided job: the decision
    and the diff as the reviewer saw it."""
    from .. import review as rv

    settings = load_settings()
    store = open_store(settings)
    current = get_job(store, job_id)
    if current.status != Status.awaiting_review:
        _show_decided(settings, current, as_json)
        return
    item = _review_call(rv.pending, store, settings, job_id)
    job = item.job
    if as_json:
        click.echo(json.dumps({"id": job.id, "workspace": job.workspace, "runner": job.runner,
                               "reasons": item.reasons, "final_text": job.final_text, "missing": item.missing,
                               "refused": item.refused, "changed_lines": item.changed_lines,
                               "tests": {"command": job.test_command, "exit_code": job.test_exit_code,
                                         "output_tail": job.test_output},
                               "evaluation": job.evaluation,
                               "diffs": [{"path": d.path, "kind": d.kind, "note": d.note, "added": d.added,
                                          "removed": d.removed, "unified": d.unified()} for d in item.diffs]},
                              indent=2))
        return
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
    for line in evaluation_lines(job.evaluation):
        click.echo(line)
    if item.missing:
        click.echo("the kept change is gone: only reject makes sense")
        return
    if item.refused:
        click.echo(f"never applied: {', '.join(item.refused)}")
    click.echo(f"change: {len(item.diffs)} paths, {item.changed_lines} changed lines")
    click.echo(rv.render_unified(item.diffs), nl=False)


def _show_decided(settings, job, as_json: bool) -> None:
    from ..review import kept

    files = kept.load(settings, job.id) if job.reviewed_at else None
    if files is None:
        raise click.ClickException(f"job {job.id} is {job.status.value}, not awaiting review"
                                   + (" (no decided diff is kept for it)" if job.reviewed_at else ""))
    decision = {"status": job.status.value, "reason": job.reason, "reviewed_by": job.reviewed_by,
                "reviewed_at": job.reviewed_at.isoformat(), "note": job.review_note, "files": job.review_files}
    if as_json:
        click.echo(json.dumps({"id": job.id, "decision": decision, "diffs": files}, indent=2))
        return
    click.echo(f"job        {job.id} ({job.status.value}: {job.reason})")
    click.echo(f"decided    {job.reviewed_at:%Y-%m-%d %H:%M:%S}Z by {job.reviewed_by}"
               + (f": {job.review_note}" if job.review_note else ""))
    click.echo(f"change as the reviewer saw it: {len(files)} paths")
    click.echo(kept.render(files), nl=False)


@review.command(name="approve")
@click.argument("job_id", shell_complete=complete_job_id)
@click.argument("more", nargs=-1)
@click.option("--files", "files", multiple=True, metavar="PATH...",
              help="Apply only these changed paths (a directory: everything changed below it).")
@click.option("--note", default=None, help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True)
def review_approve(job_id: str, more: tuple[str, ...], files: tuple[str, ...], note: str | None,
                   as_json: bool) -> None:
    """Apply the job's change exactly as tested (or only --files PATH...), with the pipeline's conflict check."""
    from .. import review as rv

    if more and not files:
        raise click.UsageError(f"unexpected arguments {' '.join(more)}: paths go after --files")
    settings = load_settings()
    store = open_store(settings)
    job = _review_call(rv.approve, store, settings, job_id, [*files, *more] or None, note, by=reviewer())
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, "applied": job.changed_files,
                               "reviewed_by": job.reviewed_by}))
        return
    click.echo(f"{job.id} {job.status.value}: applied {len(job.changed_files)} paths")
    for path in job.changed_files:
        click.echo(f"  {path}")


@review.command(name="reject")
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--note", default=None, help="Recorded with the decision.")
@click.option("--json", "as_json", is_flag=True)
def review_reject(job_id: str, note: str | None, as_json: bool) -> None:
    """Discard the job's change; the repository is not touched."""
    from .. import review as rv

    settings = load_settings()
    store = open_store(settings)
    job = _review_call(rv.reject, store, settings, job_id, note, by=reviewer())
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, "error": job.error,
                               "reviewed_by": job.reviewed_by}))
        return
    click.echo(f"{job.id} {job.status.value}: {job.error}")


@review.command(name="request-changes")
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--note", required=True, help="What should change: the follow-up job's prompt.")
@click.option("--json", "as_json", is_flag=True)
def review_request_changes(job_id: str, note: str, as_json: bool) -> None:
    """Send the change back: the job ends (rolled back, changes_requested) and a follow-up job of the same
    session, whose prompt is the note, continues its kept change. Prints the follow-up's id."""
    from .. import review as rv

    settings = load_settings()
    store = open_store(settings)
    job, follow = _review_call(rv.request_changes, store, settings, job_id, note, by=reviewer())
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, "reason": job.reason,
                               "follow_up": follow.id, "reviewed_by": job.reviewed_by}))
        return
    click.echo(f"{job.id} {job.status.value} ({job.reason}); follow-up job {follow.id} queued")




@click.command(name="land")
@click.argument("job_id", shell_complete=complete_job_id)
@click.option("--json", "as_json", is_flag=True)
def land(job_id: str, as_json: bool) -> None:
    """Apply a succeeded job of a policy with land = "branch" (its branch executor/ID) to the working tree and
    commit it on the current branch, as land = "commit" would have; nothing is applied if the repository
    changed at its paths since the job started. Run it again to finish one that was interrupted."""
    from ..review.land import land as land_job

    settings = load_settings()
    store = open_store(settings)
    job = _review_call(land_job, store, settings, job_id, by=reviewer())
    landed = (job.git or {}).get("landed") or {}
    if as_json:
        click.echo(json.dumps({"id": job.id, "status": job.status.value, **landed}))
        return
    where = f"commit {landed.get('commit')} on {landed.get('branch')}" if landed.get("commit") else "no commit"
    click.echo(f"{job.id} landed: {where}" + (f" ({landed['note']})" if landed.get("note") else ""))
