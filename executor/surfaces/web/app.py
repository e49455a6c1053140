"""The page's routes: the review queue and every job, the decisions, cancel and retry, and the live view.

Owns the Starlette app (Jinja2 templates in ``templates/``, plain HTML forms and a few lines of script for
live updates: no JavaScript framework, no build step). A waiting job's page shows its diff first, with
Approve (all files or a subset), Reject and Request changes side by side, calling the same ``review``
decisions as the CLI; a decided job's page shows the diff as the reviewer saw it and how the review ended,
with the status of the follow-up it queued as that changes; a queued job's page says why it waits (the
serving loop's snapshot); Cancel (apart from a review's decision) and Retry are offered where they apply;
the index shows every host sharing the store (budget use, last seen) and which host runs or ran each job.
``/jobs/ID/live`` streams a running job's new event rows and its status changes as server-sent events;
the page appends the rows (the stream's raw rows collapsed) and reloads when the status changes. Every
form carries a CSRF token; a decision records who made it and with which credential (the token's
fingerprint).

Must never: change a job other than through the review decisions, the store's cancel and intake's checks (a
retry), or raise into the serving loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from ... import review
from ...clock import aware, span
from ...errors import Conflict, InvalidJob, ReviewError
from ...intake import followup
from ...scheduling import snapshot
from ...scheduling.hosting import hosts_view
from ...settings import Settings
from ...store import TERMINAL, Status, Store
from ...store.status import attempt_text
from ..git_view import git_line
from ..seal_view import denial_line, egress_denials, network_view
from .access import Guard, fingerprint, page_token
from .views import PYGMENTS_CSS, decision, diff_view, event_row, kept_view

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
ACTIVE = (Status.queued, Status.waiting_retry, Status.running, Status.testing, Status.committing)
QUEUED = (Status.queued, Status.waiting_retry)
#: The statuses a job's page stops following a job made from it at.
SETTLED = sorted(st.value for st in TERMINAL)
RECENT = 30
#: Event rows a job page shows at first (the newest); the live view adds the rest as they come.
ROWS = 500
#: Seconds between a live view's looks at the store.
LIVE_EVERY = 0.5


def _when(moment) -> str:
    return aware(moment).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def create_app(settings: Settings, store: Store, closing: threading.Event | None = None) -> ASGIApp:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals.update(when=_when, ago=span, pygments_css=PYGMENTS_CSS, attempt_text=attempt_text)
    csrf = secrets.token_urlsafe(24)
    token = page_token(settings)
    credential = fingerprint(token)
    closing = closing or threading.Event()

    def page(request: Request, name: str, status_code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, name, {"csrf": csrf, **context}, status_code=status_code)

    def held() -> dict[str, str]:
        """Why queued jobs wait, as the serving loop said at its last tick."""
        return (snapshot.read(settings.status_path) or {}).get("held") or {}

    def problems() -> list[str]:
        """What the serving loop could not do at its last tick (the engine or the store away, held jobs)."""
        return (snapshot.read(settings.status_path) or {}).get("problems") or []

    async def index(request: Request) -> Response:
        def gather():
            waiting = review.queue(store)
            active = store.jobs(ACTIVE)
            settled = store.jobs(TERMINAL)
            settled.sort(key=lambda j: aware(j.finished_at or j.created_at), reverse=True)
            return (waiting, active, settled[:RECENT], review.review_stats(store.jobs()), held(),
                    hosts_view(store, settings.host_timeout), problems())

        waiting, active, recent, stats, why, hosts, trouble = await run_in_threadpool(gather)
        return page(request, "index.html", waiting=waiting, active=active, recent=recent, stats=stats,
                    since=review.since, reason_text=review.reason_text, held=why, hosts=hosts, problems=trouble)

    async def job_page(request: Request, error: str | None = None, conflicts: list[str] | None = None,
                       status_code: int = 200) -> Response:
        job_id = request.path_params["job_id"]
        view = await run_in_threadpool(_job_view, store, settings, job_id, held)
        if view is None:
            return PlainTextResponse(f"no job {job_id!r}\n", status_code=404)
        return page(request, "job.html", status_code=status_code, error=error, conflicts=conflicts,
                    since=review.since, denial_line=denial_line, settled_statuses=SETTLED, **view)

    async def live(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return PlainTextResponse("after: an event id\n", status_code=400)
        shown = request.query_params.get("status")  # the status the page was made with
        rows = request.query_params.get("rows") != "0"  # rows=0: the status alone (a follower's, on another page)
        return StreamingResponse(_live(request, store, job_id, after, shown, closing, rows),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def act(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        action = request.path_params["action"]
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), csrf.encode()):
            return PlainTextResponse("refused: the form is stale or foreign (CSRF); reload the page\n",
                                     status_code=403)
        if action not in ACTIONS:
            return PlainTextResponse("unknown action\n", status_code=404)
        note = str(form.get("note", "")).strip() or None
        by = f"web ({request.client.host if request.client else '?'}) with {credential}"
        try:
            target = await run_in_threadpool(ACTIONS[action], store, settings, job_id, form, note, by)
        except Conflict as exc:
            return await job_page(request, error=str(exc), conflicts=exc.paths, status_code=409)
        except (ReviewError, InvalidJob) as exc:
            return await job_page(request, error=str(exc), status_code=409)
        return RedirectResponse(f"/jobs/{target}", status_code=303)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    app = Starlette(routes=[
        Route("/", index),
        Route("/healthz", health),
        Route("/jobs/{job_id}", job_page),
        Route("/jobs/{job_id}/live", live),
        Route("/jobs/{job_id}/{action}", act, methods=["POST"]),
    ])
    return Guard(app, settings.ui_host, token)


# ------------------------------------------------------------------------------------------- a job


def _job_view(store: Store, settings: Settings, job_id: str, held) -> dict | None:
    job = store.get(job_id)
    if job is None:
        return None
    pending, elsewhere = None, None
    if job.status == Status.awaiting_review:
        try:
            pending = review.pending(store, settings, job_id)
        except ReviewError as exc:  # kept on another host: reviewed there
            elsewhere = str(exc)
    kept = review.kept.load(settings, job_id) if job.reviewed_at and pending is None else None
    events = store.events(job_id=job_id)
    return {
        "job": job, "pending": pending, "decision": decision(job), "elsewhere": elsewhere,
        "attempts": store.attempts(job_id),
        "diffs": [diff_view(d) for d in pending.diffs] if pending else
                 [kept_view(f, job.review_files) for f in kept or []],
        "kept": kept is not None,
        "rows": [event_row(e) for e in events[-ROWS:]], "hidden_rows": max(0, len(events) - ROWS),
        "last_event": events[-1].id if events else 0,
        "live": job.status not in TERMINAL and job.status != Status.awaiting_review,
        "waiting": held().get(job_id) if job.status in QUEUED else None,
        "followers": store.followers(job_id),
        "retryable": job.status in followup.RETRYABLE and not job.builds_on,
        "cancellable": job.status not in TERMINAL,
        "network": network_view(job), "denials": egress_denials(events),
        "git": git_line(job.git, job.id),
    }


async def _live(request: Request, store: Store, job_id: str, after: int, shown: str | None,
                closing: threading.Event, rows: bool = True) -> AsyncIterator[str]:
    """Server-sent events: ``row`` for each new event (oldest first; none when not ``rows``), ``status`` once
    the job's status is no longer the one the page was made with (the page then reloads, or shows a
    follower's new status); the stream ends there, when the job is gone, when the browser leaves, or when
    the executor stops."""
    yield "retry: 3000\n\n"
    while not closing.is_set() and not await request.is_disconnected():
        job = await run_in_threadpool(store.get, job_id)
        if job is None:
            return
        events = await run_in_threadpool(lambda: store.events(job_id=job_id, after=after)) if rows else []
        for event in events:
            after = event.id
            yield f"event: row\nid: {event.id}\ndata: {json.dumps(event_row(event))}\n\n"
        shown = shown or job.status.value
        if job.status.value != shown:
            yield f"event: status\ndata: {json.dumps({'status': job.status.value})}\n\n"
            return
        await asyncio.sleep(LIVE_EVERY)


# ----------------------------------------------------------------------------------------- actions
# Each takes (store, settings, job id, form, note, who) and returns the job whose page to show next.


def _approve(store: Store, settings: Settings, job_id: str, form, note: str | None, by: str) -> str:
    files = [str(f) for f in form.getlist("files")]
    listed = [str(f) for f in form.getlist("listed")]
    if listed and not files:
        raise ReviewError("choose at least one file to approve, or reject the job")
    chosen = files if listed and set(files) != set(listed) else None
    review.approve(store, settings, job_id, chosen, note, by=by)
    return job_id


def _reject(store: Store, settings: Settings, job_id: str, form, note: str | None, by: str) -> str:
    review.reject(store, settings, job_id, note, by=by)
    return job_id


def _request_changes(store: Store, settings: Settings, job_id: str, form, note: str | None, by: str) -> str:
    review.request_changes(store, settings, job_id, note or "", by=by)
    return job_id


def _cancel(store: Store, settings: Settings, job_id: str, form, note: str | None, by: str) -> str:
    job = store.get(job_id)
    if job is None or job.status in TERMINAL:
        raise ReviewError(f"job {job_id} already ended: nothing to cancel")
    store.request_cancel(job_id)
    log.info("job cancel requested", extra={"action": "cancel", "job": job_id, "by": by})
    return job_id


def _retry(store: Store, settings: Settings, job_id: str, form, note: str | None, by: str) -> str:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    made = store.add_job(followup.retry(job, settings))
    log.info("job retried", extra={"action": "retry", "job": job_id, "new": made.id, "by": by})
    return made.id


ACTIONS = {"approve": _approve, "reject": _reject, "request-changes": _request_changes, "cancel": _cancel,
           "retry": _retry}
