"""Notifications: a JSON POST to ``EXECUTOR_NOTIFY_URL`` when a job ends unsuccessfully or waits for review.

Owns the payload and its delivery. The body carries the same words under the keys the common receivers
read (``message``/``title`` for ntfy-style servers, ``text`` for Slack, Mattermost and Google Chat,
``content`` for Discord) plus the job's facts (``event``, ``job``, ``status``, ``reason``, ``reasons``,
``error``; for a change landed in git its ``branch`` and ``commit``, which the message names too). With
``?topic=NAME`` on the URL the body also names the topic (ntfy's JSON publishing at the server root).
Delivery happens on one background thread: a failed POST is logged and retried with backoff, and a job never
waits for it.

Must never: block or fail a job, or log the URL (webhook URLs are credentials) beyond its host.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from datetime import timezone
from urllib.parse import parse_qs, urlsplit

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
)

from ..addresses import is_loopback
from ..clock import aware, utcnow
from ..settings import DEFAULT_NOTIFY
from ..store import Job, Status
from .git_view import git_line

log = logging.getLogger(__name__)

_STOP = object()


def kind_of(job: Job) -> str | None:
    """The kind of notification a job in its current status is worth (None: it has not ended)."""
    if job.status == Status.awaiting_review:
        return "review"
    if job.status == Status.rolled_back and (job.reason or "").startswith("tests_"):
        return "tests_failed"
    if job.status == Status.failed and job.reason == "timeout":
        return "timeout"
    return job.status.value if job.status.terminal else None


def payload(job: Job, ui_url: str | None = None, topic: str | None = None) -> dict:
    """What is POSTed about ``job`` (its status decides the event; ``kind`` says more)."""
    reasons = [r.get("message", str(r)) if isinstance(r, dict) else str(r) for r in job.review_reasons or []]
    if job.status == Status.awaiting_review:
        event = "awaiting_review"
        title = f"executor: job {job.id} awaits review (runner {job.runner})"
        message = f"Job {job.id} (runner {job.runner}) passed its tests and waits for a person: " + "; ".join(reasons)
    else:
        event = job.status.value
        title = f"executor: job {job.id} {job.status.value} ({job.reason}, runner {job.runner})"
        message = (f"Job {job.id} {job.status.value.replace('_', ' ')} on runner {job.runner} ({job.reason}): "
                   f"{job.error or ''}").rstrip(": ")
    landed = git_line(job.git, job.id) if job.git and job.git.get("branch") else None
    if landed:
        message += f"\nGit: {landed}"
    link = f"{ui_url.rstrip('/')}/jobs/{job.id}" if ui_url else None
    if link:
        message += f"\n{link}"
    message = message[:1800]  # Discord refuses content over 2000 characters
    body = {
        "event": event, "kind": kind_of(job), "job": job.id, "session_id": job.session_id, "status": job.status.value,
        "reason": job.reason, "error": job.error, "reasons": reasons, "runner": job.runner,
        "workspace": job.workspace, "url": link, "branch": (job.git or {}).get("branch"),
        "commit": (job.git or {}).get("commit"), "git": landed,
        "ts": utcnow().astimezone(timezone.utc).isoformat(),
        "finished_at": aware(job.finished_at).isoformat() if job.finished_at else None,
        "title": title, "message": message, "text": f"{title}\n{message}", "content": f"**{title}**\n{message}",
    }
    if topic:
        body["topic"] = topic
    return body


class Notifier:
    """Queue notifications and deliver them in the background, retrying failures with backoff."""

    def __init__(self, url: str, *, attempts: int = 6, backoff: float = 2.0, timeout: float = 10.0,
                 ui_url: str | None = None, kinds: tuple[str, ...] | list[str] = DEFAULT_NOTIFY) -> None:
        self.url = url
        self.kinds = frozenset(kinds)
        self.attempts, self.backoff, self.timeout = max(1, attempts), backoff, timeout
        self.ui_url = ui_url
        parts = urlsplit(url)
        self.host = parts.hostname or "?"
        self.topic = (parse_qs(parts.query).get("topic") or [None])[0]
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._queue: queue.Queue = queue.Queue(maxsize=1000)
        self._closing = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._loop, name="notify", daemon=True)
        self.thread.start()

    def job_event(self, job: Job) -> None:
        """Notify about ``job`` as it is now, when its kind is one asked for. Never raises."""
        if kind_of(job) not in self.kinds:
            return
        try:
            self.send(payload(job, self.ui_url, self.topic))
        except Exception:  # noqa: BLE001 - a notification must never fail a job
            log.exception("cannot build a notification", extra={"action": "notify", "job": job.id})

    def send(self, body: dict) -> None:
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.error("notification queue full: dropped", extra={"action": "notify", "job": body.get("job")})

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (one last try each, no more waiting) within ``timeout``."""
        self._closing.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self.thread.join(timeout)

    def _loop(self) -> None:
        while True:
            body = self._queue.get()
            if body is _STOP:
                return
            self._deliver(body)

    def _post(self, body: dict) -> None:
        title = str(body.get("title", "executor")).encode("ascii", "replace").decode()
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "executor-notify", "Title": title})
        with self._opener.open(request, timeout=self.timeout) as response:
            response.read(65536)

    def _deliver(self, body: dict) -> None:
        # Closing ends the waiting: a notification that fails while the executor stops is given up.
        retrying = Retrying(
            retry=retry_if_exception_type((urllib.error.URLError, OSError, ValueError)),
            stop=stop_after_attempt(self.attempts) | stop_when_event_set(self._closing), wait=wait_exponential(multiplier=self.backoff),
            sleep=self._closing.wait, before_sleep=self._failed_once, reraise=True)
        try:
            retrying(self._post, body)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.failed += 1
            log.warning("notification to %s failed (%s); giving up", self.host, _why(exc),
                        extra={"action": "notify_failed", "job": body.get("job"), "attempt": self.attempts})
            return
        self.delivered += 1
        log.info("notification sent", extra={"action": "notify", "job": body.get("job"), "event": body.get("event")})

    def _failed_once(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("notification to %s failed (%s); will retry", self.host, _why(exc),
                    extra={"action": "notify_failed", "attempt": state.attempt_number})


def _why(exc: BaseException | None) -> str:
    return f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) else type(exc).__name__
