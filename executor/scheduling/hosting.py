"""This host among the hosts that share the store: its row, its heartbeat, the lost hosts it looks after, and
the wake-up when new work is announced.

Owns registering the host (its row, with the storage each of its workspace roots is: ``intake/storage.py``
reads, or first writes, each root's marker) and two side threads of ``executor serve``. The heartbeat
thread writes this host's row every ``EXECUTOR_HOST_HEARTBEAT`` seconds (what it holds and why its queue
waits), marks the jobs of hosts silent for longer than ``EXECUTOR_HOST_TIMEOUT`` interrupted, takes over
those under this host's roots on the same storage (rolled back and re-queued by the store's conditional
move; a committing job waits for its own host), and keeps the view of every host that ``executor
status`` shows. On PostgreSQL the listener thread LISTENs on the store's channel and sets ``wake`` at each
NOTIFY (new jobs, a freed workspace), so an idle serving loop claims at once instead of at its next poll;
while it cannot listen, the loop polls (``claim_due`` says when the loop looks at the queue). A database
that is unreachable is logged and tried again after 1 s, doubling up to the heartbeat interval; any other
failure ends the thread, which the serving loop notices and stops loudly. A host judges other hosts lost
only once its own heartbeats have been on time for longer than the host timeout: after an outage of the
database every host's heartbeat is old, and the first to reconnect must not take the others' jobs before
they could beat again.

Must never: block the serving loop or a job, take over a job whose host is alive, or touch another host's
files.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version

from sqlalchemy.exc import OperationalError as DatabaseUnreachable

from ..clock import aware
from ..errors import ConfigError
from ..intake.storage import identify
from ..logs import log_state
from ..settings import Settings
from ..store import Host, Job, Status, Store
from ..store.engine import CHANNEL, libpq_dsn
from ..store.health import unavailable
from ..store.reads import host_view
from .admission import Host as Claimer

log = logging.getLogger(__name__)


def executor_version() -> str:
    try:
        return version("executor")
    except PackageNotFoundError:
        return "unknown"


def hosts_view(store: Store, timeout: float) -> list[dict]:
    """Every host as ``executor status`` shows it (``reads.host_view``), by the database's clock."""
    now = store.db_now()
    return [host_view(host, now, timeout) for host in store.hosts()]


class Presence:
    """This host's row, heartbeat and wake-up; ``figures`` says what the host holds now."""

    def __init__(self, settings: Settings, store: Store, figures: Callable[[], dict],
                 on_wake: Callable[[], None] = lambda: None) -> None:
        self.settings, self.store, self.figures, self.on_wake = settings, store, figures, on_wake
        self.claimer = Claimer(settings.host_id, tuple(str(root) for root in settings.workspace_roots))
        self.wake = threading.Event()  # set by a NOTIFY: claim now (``on_wake`` wakes the serving loop)
        self.listening = False  # True while the LISTEN connection is up (else the loop polls every tick)
        self.store_watched = False  # SQLite: the serving loop is woken by new work (its store's wake file)
        self.hosts: list[dict] = []
        self.claim_now = True  # a slot freed or the last round started something: look at the queue again
        self._last_claim = 0.0
        self._connected_since: float | None = None  # monotonic: since when this host's beats reach the store
        self._last_beat = 0.0  # monotonic: this host's last heartbeat written
        self._stop = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self.listener = threading.Thread(target=self._listen_loop, name="listener", daemon=True) \
            if store.postgres else None

    def register(self) -> None:
        """Write this host's row (alive now) and make its own jobs its own again after a crash. Refuses
        (``ConfigError``) when another live executor already serves under this host id."""
        s = self.settings
        self._refuse_a_twin()
        storage = identify(self.claimer.roots, s.host_id, create=True)
        self.claimer = replace(self.claimer, storage=storage)
        self.store.register_host(Host(
            id=s.host_id, version=executor_version(), machine=socket.gethostname(), pid=os.getpid(),
            budget_cpus=s.budget_cpus,
            budget_memory=s.budget_memory, reserve_memory=s.reserve_memory,
            workspace_roots=[str(root) for root in s.workspace_roots], storage=storage))
        self._connected_since = self._last_beat = time.monotonic()
        back = self.store.reclaim(s.host_id)
        adopted = self.store.adopt_unowned(s.host_id, self.claimer.serving)
        stamped = self.store.stamp_storage(s.host_id, storage)
        self.hosts = self.view()
        log.info("host registered", extra={"action": "host", "host": s.host_id, "reclaimed": back,
                                           "adopted": adopted, "storage": storage, "stamped": stamped})

    def _refuse_a_twin(self) -> None:
        """Two executors under one host id would recover each other's jobs. A row that beats (younger than
        the host timeout, not stopped) belongs to a live twin, unless it is this machine's and its process
        is gone (a restart after a crash)."""
        import psutil

        row = next((h for h in self.store.hosts() if h.id == self.settings.host_id), None)
        if row is None or row.stopped_at is not None or row.pid == os.getpid():
            return
        age = (self.store.db_now() - aware(row.last_seen)).total_seconds()
        if age > self.settings.host_timeout:
            return
        here = row.machine == socket.gethostname()
        if here and not (row.pid and psutil.pid_exists(row.pid)):
            return
        where = f"process {row.pid} on this machine" if here else f"machine {row.machine or '?'} (pid {row.pid})"
        raise ConfigError(f"host id {self.settings.host_id!r} is in use by a live executor ({where}, last "
                          f"heartbeat {age:.0f}s ago): give each `executor serve` its own EXECUTOR_HOST_ID")

    def claim_due(self) -> bool:
        """Whether the serving loop looks at the queue this tick: always while nothing announces new work
        (the LISTEN connection is down, a SQLite store's wake file cannot be watched); with it, when woken,
        after a slot freed or a round that started something, and every ``claim_poll`` seconds (cooldowns
        and retries end by the clock)."""
        woken = self.wake.is_set()
        if woken:  # cleared only once seen: a NOTIFY arriving between the two would be lost
            self.wake.clear()
        return (woken or self.claim_now or not self.announced
                or time.monotonic() - self._last_claim >= self.settings.claim_poll)

    @property
    def announced(self) -> bool:
        """Whether new work in the store wakes this host (a NOTIFY, or the SQLite store's wake file)."""
        return self.listening or self.store_watched

    def claimed(self, started: bool) -> None:
        self._last_claim, self.claim_now = time.monotonic(), started

    def start(self) -> None:
        self.heartbeat.start()
        if self.listener is not None:
            self.listener.start()

    def threads(self) -> dict[str, threading.Thread]:
        found = {"heartbeat": self.heartbeat}
        if self.listener is not None:
            found["listener"] = self.listener
        return {name: thread for name, thread in found.items() if thread.ident is not None}

    def close(self) -> None:
        """Stop both threads and record a clean stop."""
        self._stop.set()
        for thread in self.threads().values():
            thread.join(timeout=15)
        try:
            self.store.stop_host(self.settings.host_id)
        except DatabaseUnreachable:
            log.warning("could not record the host's stop", extra={"action": "host", "host": self.settings.host_id})

    # -- heartbeat --------------------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        wait = self.settings.host_heartbeat
        while not self._stop.wait(wait):
            try:
                self.beat()
                wait = self.settings.host_heartbeat
            except Exception as exc:
                if not unavailable(exc):
                    raise
                wait = min(1.0 if self._connected_since is not None else wait * 2, self.settings.host_heartbeat)
                self._connected_since = None
                log.warning("heartbeat not written: the database is unreachable",
                            extra={"action": "heartbeat", "host": self.settings.host_id, "error": str(exc)[:300]})

    def beat(self) -> None:
        """One heartbeat: this host's row, then the lost hosts' jobs (once this host has reached the store for
        a whole host timeout), then the view of every host."""
        figures = self.figures()
        self.store.beat(self.settings.host_id, figures["reserved_cpus"], figures["reserved_memory"],
                        figures["running"], figures["waiting"])
        now = time.monotonic()
        if self._connected_since is None or now - self._last_beat > 2 * self.settings.host_heartbeat + 1:
            self._connected_since = now  # late (the store was away, or waited for): others' beats were too
        self._last_beat = now
        if now - self._connected_since >= self.settings.host_timeout:
            self.look_after_lost()
        self.hosts = self.view()

    def look_after_lost(self) -> list[Job]:
        """Mark the jobs of lost hosts interrupted; roll back and re-queue those under this host's roots."""
        timeout = self.settings.host_timeout
        lost, marked = self.store.mark_lost(timeout)
        for host in lost:
            log.warning("host lost", extra={"action": "host_lost", "host": host, "timeout": timeout})
        for job_id, host in marked:
            job = self.store.get(job_id)
            if job is not None:
                self.store.add_event(job, job.attempts, "host_lost", {
                    "host": host, "status": job.status.value, "seen_by": self.settings.host_id,
                    "next": "waits for its host (its commit is journaled there)" if job.status == Status.committing
                    else "its host recovers it when it returns, or a host holding its workspace root re-queues it"})
        taken = []
        for job in self.store.orphans(self.settings.host_id, self.claimer.serving, timeout):
            moved = self.store.take_over(job, self.settings.host_id, timeout)
            if moved is None:
                continue  # its host came back (or someone else moved it) first
            self.store.add_event(moved, job.attempts, "state", {
                "status": Status.queued.value, "reason": "interrupted", "error": moved.error,
                "taken_over_by": self.settings.host_id, "lost_host": job.host_id})
            log_state(moved, "taken_over", job.attempts, reason="interrupted", error=moved.error)
            taken.append(moved)
        return taken

    def view(self) -> list[dict]:
        return hosts_view(self.store, self.settings.host_timeout)

    # -- LISTEN -----------------------------------------------------------------------------------------

    def _woken(self) -> None:
        self.wake.set()
        self.on_wake()

    def _listen_loop(self) -> None:
        import psycopg

        backoff = 1.0
        while not self._stop.is_set():
            try:
                with psycopg.connect(libpq_dsn(self.store.url), autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening, backoff = True, 1.0
                    self._woken()  # what was announced while it was not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self._woken()
            except psycopg.OperationalError as exc:
                log.warning("cannot LISTEN for new jobs: polling meanwhile",
                            extra={"action": "listen", "error": str(exc)[:300]})
            self.listening = False
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
