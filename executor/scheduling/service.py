"""The serving loop: intake, admission, supervision of job threads and side threads, recovery, shutdown.

Owns the executor's process-level life as one host of the store (``EXECUTOR_HOST_ID``). Each tick it takes
new job files from its spool into the (possibly shared) store, claims the jobs of its queue that fit its
budget (``admission.py``; one thread per job, each holding a governor permit), reaps finished threads,
checks that its side threads (the sealed sandbox's event loop and recorder, the engine watch, web page,
metrics, notifier, heartbeat, listener) are alive, and writes its snapshot. A fault of the machine pauses
work and never consumes it (``faults.py``): nothing is claimed while the engine is away, a round that
cannot reach the store tries again with backoff, and a job whose thread lost the engine or the store is
held until it is settled (``unsettled.py``). An idle loop claims when new work wakes it (a NOTIFY on
PostgreSQL, the store's wake file on SQLite, a job file in the spool), after a slot freed, or every
``EXECUTOR_CLAIM_POLL`` seconds, and between rounds waits up to ``IDLE_WAIT`` (``pause``). At start-up
it starts the sealed sandbox's threads (adopted sealed jobs need their sockets again), registers its host
row and then resolves what a crash left behind of its own jobs (``recovery.py``). Shutdown has phases: stop
intake and admission and close the web page (no decision may start), tell running jobs to stop and wait a
grace period for them to roll back and re-queue, then remove what still runs and wait for every thread that
may still touch a repository, stop the sealed sandbox's threads (their last records written), record the
host's stop, and only then close the store.

Must never: start a job without a permit and a claim, run two jobs on one workspace, limp on with a dead
side thread, or close the store while a job thread may still touch a repository.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..errors import InternalError
from ..intake.spool import Spool, intake
from ..job.context import Context
from ..job.pipeline import run_job
from ..policy import Runner
from ..redact import RedactingFilter, Redactor
from ..sandbox.deployment import Deployment, Sandbox, connect, instance_id
from ..sandbox.hostpaths import HostPaths, own_container_id
from ..sandbox.seal import Sealer
from ..settings import Settings
from ..store import Job, Store
from ..store.engine import shown
from ..store.health import patience
from ..transaction import jobdisk
from ..transaction.retention import remove_expired
from . import admission, status_view
from .faults import LoopFaults
from .governor import Governor, Permit
from .hosting import Presence
from .recovery import recover
from .runners_file import RunnersFile
from .wakeup import Wakeup

log = logging.getLogger(__name__)


RETENTION_EVERY = 3600.0  # seconds between sweeps of expired job dirs
INTAKE_BUDGET = 0.25  # seconds of intake per round of the loop
IDLE_WAIT = 5.0  # at most this long between rounds of an idle loop (status.json stays fresh: < 10 s)


@dataclass
class Slot:
    job: Job
    permit: Permit
    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)  # its work is over (the thread may linger)


class Executor(LoopFaults):
    def __init__(self, settings: Settings, secrets: Mapping[str, str], client=None,
                 deployment: Deployment | None = None) -> None:
        self.settings = settings
        self.secrets = secrets
        self.redactor = Redactor()
        if settings.database_url is not None:  # the database's password is a secret like a runner's token
            from sqlalchemy.engine import make_url

            password = make_url(settings.db_url).password
            if password:
                self.redactor.update({"EXECUTOR_DATABASE_URL": str(password)})
        self.store = Store(settings.db_url, redact=self.redactor)
        self.spool = Spool(settings.spool_dir)
        # A job file arriving, new work in a SQLite store, or a slot freed wakes the loop at once.
        self.wakeup = Wakeup(self.spool.incoming, self.store.wake_path)
        if deployment is None:
            client = client or connect()
            self.paths = HostPaths.discover(client)  # in a container, the engine needs host paths
            # Named by the state root's host path: two executors in containers never sweep each other.
            instance = instance_id(Path(self.paths.to_host(str(settings.home))))
            deployment = Sandbox(client, settings.sandbox_image, instance, self.paths)
        else:
            self.paths, client = HostPaths(), None
        self.sandbox = deployment
        self._watch_machine(client)  # the engine's and the store's health, the jobs held unsettled
        self.governor = Governor.from_settings(settings)
        self.runners_file = RunnersFile(settings.policies)
        self.sealer = Sealer()  # its threads start with serve()
        self.disk: jobdisk.Enforcement | None = None  # how the policies' disk caps hold (decided at start)
        self.ctx = Context(settings=settings, store=self.store, sandbox=self.sandbox,
                           runners=self._load_runners(), secrets=secrets, redactor=self.redactor,
                           sealer=self.sealer, engine=self.engine)
        self.slots: dict[str, Slot] = {}
        self.waiting: str | None = None  # why the head of the queue is not running
        self.held: dict[str, str] = {}  # why each job at the head of the queue waits (admission order)
        self._explained = 0.0
        self.presence = Presence(settings, self.store, self._figures, on_wake=self.wakeup.wake)
        self.presence.store_watched = "store" in self.wakeup.watching  # SQLite: new work wakes the loop
        self.last_tick = 0.0
        self._last_retention = 0.0
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the next call measures since now
        self.metrics = None  # the Prometheus endpoint (metrics.ExecutorMetrics) when metrics_port is set
        self.web = None  # the review web page (web.WebServer) when ui_port is set
        self.notifier = None  # notify.Notifier when notify_url is set
        for name in ("ui_token", "notify_url"):  # the executor's own secrets: never stored or logged
            value = getattr(settings, name)
            if value is not None:
                self.redactor.update({f"EXECUTOR_{name.upper()}": value.get_secret_value()})

    def _load_runners(self) -> dict[str, Runner]:
        """The runners in use (``runners_file.py``: re-read when the file changed, kept when it broke)."""
        if self.runners_file.reload() or not hasattr(self, "ctx"):
            # Whatever a runner's credential is, it is scrubbed from everything stored or logged.
            self.redactor.update({r.auth_env: self.secrets.get(r.auth_env, "")
                                  for r in self.runners_file.runners.values()})
        return self.runners_file.runners

    # -- life -----------------------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, then shut down in phases. Raises ``InternalError`` when a side thread
        died (the process then exits non-zero and its supervisor restarts it)."""
        log_filter = RedactingFilter(self.redactor)
        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter)
        self.sandbox.check_image()
        self.engine.start()  # counts the engine's outages from here on (adopted attempts are vouched for too)
        self.disk = jobdisk.decide(self.settings, in_container=own_container_id() is not None)
        self.ctx.disk_images = self.disk.images
        log.info("disk cap", extra={"action": "disk_cap", "mode": self.disk.mode, "why": self.disk.why})
        self.sealer.start()
        self.presence.register()
        recover(self)
        self._start_side_threads()
        log.info("executor serving", extra={"action": "serve", "home": str(self.settings.home),
                                            "host": self.settings.host_id, "store": shown(self.settings.db_url)})
        patience(0)  # this thread never waits for the database: a round that cannot reach it tries again later
        try:
            while not stop.is_set():
                busy = self.tick()
                self.check_side_threads()
                if not busy and not stop.is_set() and self.wakeup.wait(self.pause()):
                    self.presence.claim_now = True  # woken: a job file, new work in the store, a slot freed
        finally:
            self.shutdown()

    def pause(self) -> float:
        """How long the loop waits for a wake-up: ``poll_interval`` while it has anything in hand (jobs
        running, the head of its queue waiting for room, jobs held unsettled, the engine away) or while new
        work could arrive unannounced; when idle, up to ``IDLE_WAIT`` (an idle executor costs almost
        nothing, and new work wakes it at once: the spool's and the SQLite store's inotify watches, a
        NOTIFY, a slot freed; cooldowns and retry times end by the clock, looked at every claim_poll)."""
        poll = self.settings.poll_interval
        announced = "spool" in self.wakeup.watching and self.presence.announced
        if self.slots or self.waiting or self.unsettled or not announced:
            return poll
        return max(poll, min(IDLE_WAIT, self.settings.claim_poll))

    def _start_side_threads(self) -> None:
        from ..surfaces.metrics import serve_metrics
        from ..surfaces.notify import Notifier
        from ..surfaces.web import serve_web, web_url

        self.presence.start()
        self.metrics = serve_metrics(self.settings, self.store)
        self.web = serve_web(self.settings, self.store)
        if self.metrics is not None:
            self.ctx.listeners.append(self.metrics.job_settled)
        if self.settings.notify_url is not None:
            self.notifier = Notifier(self.settings.notify_url.get_secret_value(), ui_url=web_url(self.settings),
                                     kinds=self.settings.notify_on)
            self.ctx.listeners.append(self.notifier.job_event)

    def side_threads(self) -> dict[str, threading.Thread]:
        """The threads the executor needs besides its job threads, by name."""
        threads = {**self.sealer.threads(), **self.presence.threads()}
        if self.engine.thread.ident is not None:
            threads["engine watch"] = self.engine.thread
        for name, owner in (("web page", self.web), ("metrics endpoint", self.metrics), ("notifier", self.notifier)):
            if owner is not None:
                threads[name] = owner.thread
        return threads

    def check_side_threads(self) -> None:
        """A side thread that died stops the executor loudly, instead of limping on without it."""
        dead = sorted(name for name, thread in self.side_threads().items() if not thread.is_alive())
        if dead:
            log.error("side thread died: stopping", extra={"action": "side_thread_died", "threads": dead})
            raise InternalError(f"the executor's {', '.join(dead)} thread stopped unexpectedly; the executor "
                                "stops (its supervisor restarts it); see the log above for why")

    def tick(self) -> bool:
        """One round of the loop; True when spool files are left for the next round (a flood is taken in
        slices of ``INTAKE_BUDGET`` seconds, so the status and admission keep up). A round that meets a fault
        of the machine (the store away, the engine away, a full state root) records it and goes on."""
        self.ctx.runners = self._load_runners()
        self._store_failed = False
        more = self._guarded(self._intake)
        self.reap()
        if self.engine.reachable and self.unsettled:
            self._guarded(self.unsettled.retry, self)
        self._guarded(self._sweep_after_outage)
        self.keep_disk_reserve()
        self._guarded(self.admit)
        self.last_tick = time.time()
        if self.last_tick - self._last_retention > RETENTION_EVERY:
            self._last_retention = self.last_tick
            self._guarded(remove_expired, self.settings, self.store)
        if self.store_health.due() and not self._store_failed:
            self.store_health.answered()
        self._write_status()
        return bool(more)

    def _intake(self) -> bool:
        taken = intake(self.spool, self.store, self.settings, self.ctx.runners, budget=INTAKE_BUDGET,
                       translate=self.paths.to_container, storage=self.presence.claimer.storage)
        for job_id in taken.rejected_ids:  # a refused job file is an ending too (status rejected)
            if (job := self.store.get(job_id)) is not None:
                self.ctx.settled(job)
        if self.metrics is not None and taken.rejected:
            self.metrics.rejected.inc(len(taken.rejected))
        return taken.more

    def shutdown(self, grace: float = 60.0) -> None:
        """Phases: no new work or decisions; running jobs told to stop and given ``grace`` to roll back and
        re-queue; what still runs is removed; every thread that may touch a repository is waited for; then
        the store closes."""
        self.ctx.shutdown.set()
        if self.web is not None:
            self.web.close()  # no review decision may start while the executor goes down
        self._join_jobs(time.monotonic() + grace)
        self._let_go_of_held()
        if self.slots:
            log.error("jobs still running after the shutdown grace: removing their containers",
                      extra={"action": "shutdown", "jobs": sorted(self.slots)})
            for job_id in list(self.slots):
                try:
                    self.sandbox.remove_job_objects(job_id)
                except Exception as exc:  # noqa: BLE001 - the engine is away: start-up recovery sweeps them
                    log.error("cannot remove a job's containers", extra={"job": job_id, "error": str(exc)})
            self._join_jobs(None)
            self._let_go_of_held()
        for closing in (self.metrics, self.notifier, self.presence, self.engine):
            if closing is not None:
                closing.close()
        self.sealer.stop()  # every job thread is done: no socket is open, the recorder writes its last rows
        self.store.close()
        self.wakeup.close()
        log.info("executor stopped", extra={"action": "stopped"})

    def _join_jobs(self, deadline: float | None) -> None:
        """Wait for job threads (until ``deadline``, or for as long as they take when None)."""
        for slot in list(self.slots.values()):
            slot.thread.join(timeout=None if deadline is None else max(0.1, deadline - time.monotonic()))
        self.reap()

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> dict:
        """What ``executor status`` shows (``status_view.py``)."""
        return status_view.build(self)

    def _write_status(self) -> None:
        view = self.status()
        if self.metrics is not None:
            self.metrics.refresh(self.store, view)  # one aggregate query; a scrape reads this snapshot
        self._write_snapshot(view)

    def runner_view(self) -> list[dict]:
        return status_view.runners(self)

    # -- scheduling -----------------------------------------------------------------------------------

    def _figures(self) -> dict:
        """What this host holds now, for its heartbeat."""
        reserved = self.governor.snapshot()["reserved"]
        return {"reserved_cpus": reserved["cpus"], "reserved_memory": reserved["memory"],
                "running": len(self.slots), "waiting": self.waiting}

    def reap(self) -> None:
        for job_id, slot in list(self.slots.items()):
            if job_id in self.unsettled:
                continue  # its thread ended but the job is still this host's: it keeps its slot
            if slot.done.is_set() or not slot.thread.is_alive():
                self.governor.release(slot.permit)
                del self.slots[job_id]
                self.ctx.stop_requests.pop(job_id, None)
                self.presence.claim_now = True

    def keep_disk_reserve(self) -> None:
        """When running jobs push the state root's free space below the reserve, stop the largest writer."""
        short = self.governor.disk_short()
        if short is None or "disk_reserve" in self.ctx.stop_requests.snapshot().values():
            return
        measured = {job_id: dog.disk.bytes for job_id, dog in self.ctx.watchdogs.snapshot().items()
                    if dog.disk is not None}
        if not measured:
            return
        largest = max(measured, key=measured.get)
        self.ctx.stop_requests[largest] = "disk_reserve"
        log.warning("disk reserve crossed: stopping the largest writer", extra={
            "action": "disk_reserve", "job": largest, "bytes": measured[largest], "why": short})

    def admit(self) -> None:
        """Claim and start the jobs of this host's queue that fit its budget now (``admission.claim``); none
        while the engine is away (they could only fail to start: an outage pauses work, never consumes it)."""
        if self.ctx.shutdown.is_set():
            return
        per_runner: dict[str, int] = {}
        for slot in self.slots.values():
            per_runner[slot.job.runner] = per_runner.get(slot.job.runner, 0) + 1
        if (paused := self.engine.reason()) is not None:
            self.waiting = f"{paused}: no job starts until it answers"
            self._explain_queue(per_runner, paused)
        if paused is not None or not self.presence.claim_due():
            return
        plan = admission.claim(self.store, self.governor, self.presence.claimer, self.ctx.runners, per_runner,
                               busy=list(self.slots), start=self.start)
        self.presence.claimed(started=bool(plan.starts))
        self.waiting = plan.waiting
        self._explain_queue(per_runner)

    def _explain_queue(self, per_runner: dict[str, int], paused: str | None = None) -> None:
        """Why the jobs at the head of the queue wait (for ``status``, ``show`` and the page), in words, at most
        once a second (it reads the queue's head and the holding jobs: cheap, but not for every tick).
        ``paused``: why nothing starts at all now (the engine is away), every waiting job's reason."""
        if time.monotonic() - self._explained < 1.0:
            return
        self._explained = time.monotonic()
        self.held = admission.explain(self.store, self.governor, self.presence.claimer, self.ctx.runners,
                                      per_runner, status_view.HELD_SHOWN, paused, self.presence.hosts)

    def start(self, job: Job, permit: Permit, target: Callable | None = None, *args) -> None:
        thread = threading.Thread(target=self._run, args=(target or run_job, job.id, *args),
                                  name=f"job-{job.id}", daemon=True)
        self.slots[job.id] = Slot(job, permit, thread)
        thread.start()
