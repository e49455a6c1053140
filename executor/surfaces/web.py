"""The review web page served by ``executor serve`` when ``EXECUTOR_UI_PORT`` is set.

Owns the Starlette app (Jinja2 templates in ``templates/``, plain HTML forms: no JavaScript framework, no
build step) and the uvicorn server thread it runs on. It shows the review queue, each waiting job's reasons,
final message, tests and diff (coloured by Pygments) beside its network (an unsealed job flagged) and the
egress requests its proxy denied, with approve (all files or a subset) and reject forms that call the same
``review.approve``/``review.reject`` as the CLI; and a read-only view of every host sharing the store
(budget use, last seen), of running and recent jobs with the host that ran each attempt, and of their
event log.

Access: decisions belong to people, and a job can reach loopback (a ``host``-network job shares it), so
every request needs the page's token, on loopback too: ``EXECUTOR_UI_TOKEN``, or else a random token made
at first start in ``$EXECUTOR_HOME/ui-token`` (mode 0600, never inside any container; ``executor review url``
prints the address with it). It goes in ``Authorization: Bearer`` or ``?token=`` once (a browser then keeps
it in a strict same-site cookie). Bound to 127.0.0.1 unless ``EXECUTOR_UI_HOST`` says otherwise; on loopback
only loopback ``Host`` names are served (no DNS rebinding); every form carries a CSRF token. A decision
records who made it and with which credential (the token's fingerprint).

Must never: listen anywhere but the configured address, change a job other than through ``review.py``, or
raise into the serving loop.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import uvicorn
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import review
from ..addresses import is_loopback
from ..agent.describe import describe
from ..clock import aware, span
from ..errors import ConfigError, Conflict, ReviewError
from ..scheduling.hosting import hosts_view
from ..settings import Settings
from ..store import TERMINAL, Status, Store
from .seal_view import denial_line, egress_denials, network_view

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "executor_ui_token"
ACTIVE = (Status.queued, Status.waiting_retry, Status.running, Status.testing, Status.committing)
RECENT = 30


def web_url(settings: Settings) -> str | None:
    """Where the page is reached (for links in notifications); None when it is off."""
    if settings.ui_port is None:
        return None
    host = settings.ui_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.ui_port}"


# --------------------------------------------------------------------------------------------- access


TOKEN_FILE = "ui-token"


def page_token(settings: Settings) -> str:
    """The token every request needs: ``EXECUTOR_UI_TOKEN``, or the state root's own, made once at random."""
    if settings.ui_token is not None:
        return settings.ui_token.get_secret_value()
    path = settings.home / TOKEN_FILE
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return _read_token(path)


def _read_token(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        token = fh.read().strip()
    if len(token) < 16:
        raise ConfigError(f"{path} holds no usable token (remove it: the executor makes a new one)")
    return token


def fingerprint(token: str) -> str:
    """How a decision names the credential it was made with, without revealing it."""
    return "token sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class Guard:
    """ASGI middleware: token, Host and refusal rules in front of every route."""

    def __init__(self, app: ASGIApp, host: str, token: str) -> None:
        self.app, self.host, self.token = app, host, token
        self.loopback = is_loopback(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await PlainTextResponse(refusal, status_code=403)(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None:
            # A token in the URL: keep it in a cookie and drop it from the address bar (and history).
            query = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> str | None:
        if self.loopback:
            name = (request.url.hostname or "").strip("[]")
            if not (is_loopback(name) or name == self.host):
                return "refused: this page answers only to loopback host names\n"
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return ("refused: a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN once; "
                    "`executor review url` prints the address with it)\n")
        return None


# ------------------------------------------------------------------------------------------ diff view


_FORMATTER = HtmlFormatter(nowrap=True)
PYGMENTS_CSS = HtmlFormatter(style="default").get_style_defs(".code")


def _lexer(path: str):
    try:
        return get_lexer_for_filename(path, stripnl=False, stripall=False, ensurenl=False)
    except ClassNotFound:
        return TextLexer(stripnl=False, ensurenl=False)


def _highlight_lines(path: str, text: str | None) -> list[str]:
    """One HTML string per line of ``text``, coloured as the file's language (escaped plain text if not)."""
    if not text:
        return []
    lines = text.splitlines()
    if len(text) > 512 * 1024:
        return [html.escape(line) for line in lines]
    lexer = _lexer(path)
    if text.split("\n")[:len(lines)] == [line.rstrip("\r") for line in lines] and "\r" not in text:
        out = highlight(text, lexer, _FORMATTER).split("\n")
        if len(out) >= len(lines):
            return out[:len(lines)]
    return [highlight(line, lexer, _FORMATTER).rstrip("\n") for line in lines]


def diff_view(diff: review.FileDiff) -> dict:
    """A file's diff ready for the template: hunks whose lines carry coloured HTML."""
    old = _highlight_lines(diff.path, diff.old)
    new = _highlight_lines(diff.path, diff.new)
    hunks = []
    for hunk in diff.hunks():
        rows = []
        for tag, old_no, new_no, text in hunk["lines"]:
            source = new if tag == "+" else old
            number = new_no if tag == "+" else old_no
            code = source[number - 1] if number is not None and number - 1 < len(source) else html.escape(text)
            rows.append({"tag": tag, "old": old_no, "new": new_no, "html": code})
        hunks.append({"header": hunk["header"], "rows": rows})
    return {"path": diff.path, "kind": diff.kind, "note": diff.note, "added": diff.added,
            "removed": diff.removed, "removed_paths": diff.removed_paths, "hunks": hunks}


# ---------------------------------------------------------------------------------------------- app


def _when(moment) -> str:
    return aware(moment).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def create_app(settings: Settings, store: Store) -> ASGIApp:
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals.update(when=_when, ago=span, pygments_css=PYGMENTS_CSS)
    csrf = secrets.token_urlsafe(24)
    token = page_token(settings)
    credential = fingerprint(token)

    def page(request: Request, name: str, status_code: int = 200, **context) -> Response:
        return templates.TemplateResponse(request, name, {"csrf": csrf, **context}, status_code=status_code)

    async def index(request: Request) -> Response:
        def gather():
            waiting = review.queue(store)
            active = store.jobs(ACTIVE)
            settled = store.jobs(TERMINAL)
            settled.sort(key=lambda j: aware(j.finished_at or j.created_at), reverse=True)
            return (waiting, active, settled[:RECENT], review.review_stats(store.jobs()),
                    hosts_view(store, settings.host_timeout))

        waiting, active, recent, stats, hosts = await run_in_threadpool(gather)
        return page(request, "index.html", waiting=waiting, active=active, recent=recent, stats=stats,
                    hosts=hosts, since=review.since, reason_text=review.reason_text)

    async def job_page(request: Request, error: str | None = None, conflicts: list[str] | None = None,
                       status_code: int = 200) -> Response:
        job_id = request.path_params["job_id"]
        job = await run_in_threadpool(store.get, job_id)
        if job is None:
            return PlainTextResponse(f"no job {job_id!r}\n", status_code=404)
        pending = None
        if job.status == Status.awaiting_review:
            try:
                pending = await run_in_threadpool(review.pending, store, settings, job_id)
            except ReviewError as exc:  # kept on another host: shown there
                error = error or str(exc)
        events = await run_in_threadpool(store.events, job_id)
        attempts = await run_in_threadpool(store.attempts, job_id)
        denials = egress_denials(events)
        diffs = [diff_view(d) for d in pending.diffs] if pending else []
        done = request.query_params.get("done")
        return page(request, "job.html", status_code=status_code, job=job, pending=pending, diffs=diffs,
                    attempts=attempts,
                    events=events[-500:], describe=describe, error=error, conflicts=conflicts,
                    done=done if done in ("approved", "rejected") else None, since=review.since,
                    network=network_view(job), denials=denials, denial_line=denial_line)

    async def decide(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        action = request.path_params["action"]
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), csrf.encode()):
            return PlainTextResponse("refused: the form is stale or foreign (CSRF); reload the page\n",
                                     status_code=403)
        note = str(form.get("note", "")).strip() or None
        by = f"web ({request.client.host if request.client else '?'}) with {credential}"
        try:
            if action == "approve":
                files = [str(f) for f in form.getlist("files")]
                listed = [str(f) for f in form.getlist("listed")]
                if listed and not files:
                    raise ReviewError("choose at least one file to approve, or reject the job")
                chosen = files if listed and set(files) != set(listed) else None
                await run_in_threadpool(lambda: review.approve(store, settings, job_id, chosen, note, by=by))
                done = "approved"
            elif action == "reject":
                await run_in_threadpool(lambda: review.reject(store, settings, job_id, note, by=by))
                done = "rejected"
            else:
                return PlainTextResponse("unknown action\n", status_code=404)
        except Conflict as exc:
            return await job_page(request, error=str(exc), conflicts=exc.paths, status_code=409)
        except ReviewError as exc:
            return await job_page(request, error=str(exc), status_code=409)
        return RedirectResponse(f"/jobs/{job_id}?done={done}", status_code=303)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    app = Starlette(routes=[
        Route("/", index),
        Route("/healthz", health),
        Route("/jobs/{job_id}", job_page),
        Route("/jobs/{job_id}/{action}", decide, methods=["POST"]),
    ])
    return Guard(app, settings.ui_host, token)


# ------------------------------------------------------------------------------------------- server


class WebServer:
    """uvicorn in a thread of the executor's process."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.host = host

    def start(self, timeout: float = 15.0) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the review web page cannot listen on {self.host}:{self.server.config.port} "
                                  "(EXECUTOR_UI_HOST / EXECUTOR_UI_PORT); see the log")
            time.sleep(0.05)
        log.info("review web page serving", extra={"action": "web", "host": self.host, "port": self.port})
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.server.config.port

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def serve_web(settings: Settings, store: Store) -> WebServer | None:
    """Start the page when ``ui_port`` is set."""
    if settings.ui_port is None:
        return None
    return WebServer(create_app(settings, store), settings.ui_host, settings.ui_port).start()
