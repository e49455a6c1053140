"""The container engine's health as the executor sees it: answering, or unreachable since a moment.

Owns knowing when the engine went away and came back, and vouching for an attempt's view of its containers.
A watch thread holds the engine's event stream open (daemon events only: it carries nothing while all is
well); the stream breaks when the engine process goes, so each outage is counted (``epoch``) even when the
engine is back before anyone asked it anything. While it is away the thread tries again with backoff
(0.25 s doubling to 5 s), and the moment the stream opens again the engine is reachable. ``probe`` asks the
engine over a new connection: an engine that is shutting down stops accepting new connections at once while
it still answers old ones (and stops the containers), so only a new connection tells the truth.

An attempt notes the epoch when it starts and, before its ending is recorded, asks ``vouch``: when the engine
went away at any moment since (or does not answer now), what the attempt saw (an exit code, a missing
container, a failed call) may be the engine's doing, not the job's, and ``EngineUnavailable`` is raised
instead: the job stays its host's and is adopted or rolled back once the engine answers (``unsettled.py``).

Must never: create, start or remove an engine object (``deployment.py`` does), block a job on the engine,
or stop: the watch thread outlives every error (a dead one would stop the executor).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import requests
import urllib3
from docker.errors import DockerException

from ..clock import utcnow
from ..errors import EngineUnavailable, SandboxError

log = logging.getLogger(__name__)

#: Errors of the Docker SDK and its HTTP layer: the engine failed, not the job.
ENGINE_ERRORS = (DockerException, requests.RequestException, urllib3.exceptions.HTTPError)


def timed_out(error: BaseException) -> bool:
    """A call that waited its timeout out (the SDK raises a ``ConnectionError`` around a read timeout)."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.ReadTimeoutError)):
        return True
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in getattr(error, "args", ()))


def engine_error(error: BaseException) -> bool:
    """Whether ``error`` came from talking to the engine (a ``SandboxError`` wraps what the engine said)."""
    return isinstance(error, (*ENGINE_ERRORS, SandboxError, EngineUnavailable))


class EngineHealth:
    """``ping``: asks the engine over a new connection (raises when it does not answer); ``events``: opens the
    engine's event stream (an iterable that ends, or raises, when the engine goes). Without them (unit
    tests on a fake deployment) the engine is always reachable."""

    def __init__(self, ping: Callable[[], object] | None = None, events: Callable[[], object] | None = None,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._ping, self._events, self.on_change = ping, events, on_change
        self.epoch = 0  # outages seen so far
        self.since: str | None = None  # UTC, ISO: when the current outage began (None: reachable)
        self.error: str | None = None
        self.last_error = "it went away and came back"  # why the last outage began (kept after it ends)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream: object | None = None
        self.thread = threading.Thread(target=self._watch, name="engine watch", daemon=True)

    @classmethod
    def of(cls, client, on_change: Callable[[], None] = lambda: None) -> EngineHealth:
        """The health of the engine ``client`` talks to (found again as ``connect`` finds it: ``DOCKER_HOST``),
        each probe and each event stream on a client of its own (new connections)."""
        import docker

        version = client.api.api_version

        def ping() -> None:
            fresh = docker.from_env(version=version, timeout=5)
            try:
                fresh.ping()
            finally:
                fresh.close()

        def events():
            return docker.from_env(version=version, timeout=10).events(decode=True, filters={"type": "daemon"})

        return cls(ping, events, on_change)

    # -- state -------------------------------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        return self.since is None

    def reason(self) -> str | None:
        """Why nothing starts now, in words (``engine unreachable since 03:27:09 UTC``), or None."""
        since = self.since
        return None if since is None else f"engine unreachable since {since[11:19]} UTC"

    def view(self) -> dict:
        return {"state": "reachable" if self.reachable else "unreachable", "since": self.since,
                "error": self.error, "outages": self.epoch}

    def lost(self, why: str) -> None:
        """The engine does not answer (seen by the watch thread, a probe or a job's call)."""
        with self._lock:
            if self.since is not None:
                return
            self.epoch += 1
            self.since, self.error = utcnow().isoformat(), why[:300]
            self.last_error = self.error
        log.warning("engine unreachable: claims pause, running jobs wait for it", extra={
            "action": "engine_down", "error": why[:300]})
        self.on_change()

    def _back(self) -> None:
        with self._lock:
            if self.since is None:
                return
            since, self.since, self.error = self.since, None, None
        log.warning("engine reachable again", extra={"action": "engine_up", "since": since})
        self.on_change()

    # -- asking -------------------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Ask the engine now, over a new connection; False (and the outage recorded) when it does not answer."""
        if self._ping is None:
            return self.reachable
        try:
            self._ping()
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the engine did not answer
            self.lost(f"the engine does not answer: {exc}")
            return False
        return self.reachable

    def vouch(self, since: int) -> None:
        """Return when the engine answered throughout since ``since`` (an ``epoch``) and answers now; else raise
        ``EngineUnavailable``: what the attempt saw of its containers is not to be trusted."""
        if self.epoch == since and self.probe() and self.epoch == since:
            return
        raise EngineUnavailable(f"the container engine was unreachable during the attempt ({self.last_error}); the "
                                "job waits "
                                "for it, then its container is adopted if it still runs, else the attempt is "
                                "rolled back and the job re-queued")

    # -- the watch thread ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._events is not None:
            self.thread.start()

    def close(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a stream that already broke
                stream.close()  # type: ignore[attr-defined]
        if self.thread.ident is not None:
            self.thread.join(timeout=10)

    def _watch(self) -> None:
        delay = 0.25
        while not self._stop.is_set():
            try:
                self._stream = self._events()  # type: ignore[misc]
                self._back()
                delay = 0.25
                for _ in self._stream:  # type: ignore[attr-defined]
                    if self._stop.is_set():
                        return
                why = "the engine closed its event stream (it stopped or restarted)"
            except Exception as exc:  # noqa: BLE001 - every failure means the same: no engine now
                why = f"the engine does not answer: {exc}"
            finally:
                self._stream = None
            if self._stop.is_set():
                return
            self.lost(why)
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)
