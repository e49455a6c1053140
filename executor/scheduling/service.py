"""The serving loop: intake, admission, supervision of job threads and side threads, recovery, shutdown.

Owns the executor's process-level life as one host of the store (``EXECUTOR_HOST_ID``). Each tick it takes
new job files from its spool into the (possibly shared) store, claims the jobs of its queue that fit its
budget (``admission.py``; one thread per job, each holding a governor permit), reaps finished threads,
checks that its side threads (the sealed sandbox's event loop and recorder, web page, metrics, notifier,
heartbeat, listener) are alive, and writes its snapshot. With PostgreSQL an idle loop claims when a NOTIFY
wakes it, after a slot freed, or every ``EXECUTOR_CLAIM_POLL`` seconds; with SQLite every tick. At start-up
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
from docker.errors import DockerException

from ..clock import utcnow
from ..errors import ExecutorError, IllegalTransition, InternalError
from ..intake.spool import Spool, intake
from ..job.context import Context
from ..job.pipeline import run_job
from ..policy import Runner
from ..redact import RedactingFilter, Redactor
from ..sandbox.deployment import Deployment, Sandbox, connect, instance_id
from ..sandbox.disk import free_bytes
from ..sandbox.hostpaths import HostPaths, own_container_id
from ..sandbox.seal import Sealer
from ..settings import Settings
from ..store import Job, Status, Store
from ..store.engine import shown
from ..transaction import jobdisk
from ..transaction.commit import Ending, Phase, settle
from ..transaction.retention import remove_expired
from ..transaction.workspace import Workspace
from . import admission, snapshot
from .governor import Governor, Permit
from .hosting import Presence
from .recovery import ACTIVE, recover
from .runners_file import RunnersFile
from .wakeup import Wakeup

log = logging.getLogger(__name__)

#: How many waiting jobs' reasons the status snapshot carries (the queue's head, where reasons matter).
HELD_SHOWN = 500

RETENTION_EVERY = 3600.0  # seconds between sweeps of expired job dirs
INTAKE_BUDGET = 0.25  # seconds of intake per round of the loop


@dataclass
class Slot:
    job: Job
    permit: Permit
    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)  # its work is over (the thread may linger)


class Executor:
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
        self.wakeup = Wakeup(self.spool.incoming)  # a job file arriving, or a slot freed, wakes the loop at once
        if deployment is None:
            client = client or connect()
            self.paths = HostPaths.discover(client)  # in a container, the engine needs host paths
            # Named by the state root's host path: two executors in containers never sweep each other.
            instance = instance_id(Path(self.paths.to_host(str(settings.home))))
            deployment = Sandbox(client, settings.sandbox_image, instance, self.paths)
        else:
            self.paths = HostPaths()
        self.sandbox = deployment
        self.governor = Governor.from_settings(settings)
        self.runners_file = RunnersFile(settings.policies)
        self.sealer = Sealer()  # its threads start with serve()
        self.disk: jobdisk.Enforcement | None = None  # how the policies' disk caps hold (decided at start)
        self.ctx = Context(settings=settings, store=self.store, sandbox=self.sandbox,
                           runners=self._load_runners(), secrets=secrets, redactor=self.redactor,
                           sealer=self.sealer)
        self.slots: dict[str, Slot] = {}
        self.waiting: str | None = None  # why the head of the queue is not running
        self.held: dict[str, str] = {}  # why each job at the head of the queue waits (admission order)
        self._explained = 0.0
        self.presence = Presence(settings, self.store, self._figures, on_wake=self.wakeup.wake)
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
        self.disk = jobdisk.decide(self.settings, in_container=own_container_id() is not None)
        self.ctx.disk_images = self.disk.images
        log.info("disk cap", extra={"action": "disk_cap", "mode": self.disk.mode, "why": self.disk.why})
        self.sealer.start()
        self.presence.register()
        recover(self)
        self._start_side_threads()
        log.info("executor serving", extra={"action": "serve", "home": str(self.settings.home),
                                            "host": self.settings.host_id, "store": shown(self.settings.db_url)})
        try:
            while not stop.is_set():
                busy = self.tick()
                self.check_side_threads()
                if not busy and not stop.is_set():
                    self.wakeup.wait(self.settings.poll_interval)
        finally:
            self.shutdown()

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
        slices of ``INTAKE_BUDGET`` seconds, so the status and admission keep up)."""
        self.ctx.runners = self._load_runners()
        taken = intake(self.spool, self.store, self.settings, self.ctx.runners, budget=INTAKE_BUDGET,
                       translate=self.paths.to_container)
        for job_id in taken.rejected_ids:  # a refused job file is an ending too (status rejected)
            if (job := self.store.get(job_id)) is not None:
                self.ctx.settled(job)
        if self.metrics is not None and taken.rejected:
            self.metrics.rejected.inc(len(taken.rejected))
        self.reap()
        self.keep_disk_reserve()
        self.admit()
        self.last_tick = time.time()
        if self.last_tick - self._last_retention > RETENTION_EVERY:
            self._last_retention = self.last_tick
            remove_expired(self.settings, self.store)
        self._write_status()
        return taken.more

    def shutdown(self, grace: float = 60.0) -> None:
        """Phases: no new work or decisions; running jobs told to stop and given ``grace`` to roll back and
        re-queue; what still runs is removed; every thread that may touch a repository is waited for; then
        the store closes."""
        self.ctx.shutdown.set()
        if self.web is not None:
            self.web.close()  # no review decision may start while the executor goes down
        self._join_jobs(time.monotonic() + grace)
        if self.slots:
            log.error("jobs still running after the shutdown grace: removing their containers",
                      extra={"action": "shutdown", "jobs": sorted(self.slots)})
            for job_id in list(self.slots):
                self.sandbox.remove_job_objects(job_id)
            self._join_jobs(None)
        for closing in (self.metrics, self.notifier, self.presence):
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
        """What ``executor status`` shows: budget, reservations, measured use, running jobs, the queue."""
        running = [self._running_view(job_id, slot) for job_id, slot in list(self.slots.items())]
        with self._process.oneshot():
            executor_use = {"rss": self._process.memory_info().rss,
                            "cpu_percent": self._process.cpu_percent(None)}
        counts = self.store.counts()
        return {
            **self.governor.snapshot(),
            "ts": time.time(),
            "pid": self._process.pid,
            "host": self.settings.host_id,
            "hosts": self.presence.hosts,
            "poll_interval": self.settings.poll_interval,  # how fresh a snapshot must be to say "running"
            # Where the engine finds what this executor sees (its container's bind mounts), for `submit` on the host.
            "host_paths": [list(pair) for pair in self.paths.binds],
            # What `executor submit` judges a job file by: this executor's own settings, not the submitter's.
            "settings": {"home": str(self.settings.home), "policies": str(self.settings.policies),
                         "workspace_roots": [str(r) for r in self.settings.workspace_roots],
                         "budget_cpus": self.settings.budget_cpus, "budget_memory": self.settings.budget_memory,
                         "reserve_memory": self.settings.reserve_memory},
            "measured": {
                "executor": executor_use,
                "jobs": {"cpu_cores": round(sum(r["cpu_cores"] or 0 for r in running), 4),
                         "memory": sum(r["memory_used"] or 0 for r in running)},
                "host": {"memory_available": psutil.virtual_memory().available},
                "disk": {"state_root_free": free_bytes(self.settings.home), "reserve": self.settings.disk_reserve,
                         "jobs": sum(r["disk_used"] or 0 for r in running),
                         "cap": self.disk.mode if self.disk else None},
            },
            "running": running,
            "queue_length": counts.get(Status.queued, 0),
            "counts": {st.value: n for st, n in counts.items()},
            "waiting": self.waiting,
            # Why queued jobs wait, for `show` and the page: the first HELD_SHOWN in admission order.
            "held": dict(list(self.held.items())[:HELD_SHOWN]),
            "runners": self.runner_view(),
            "problems": [p for p in (self.runners_file.problem,) if p],  # configuration the loop could not take
        }

    def _running_view(self, job_id: str, slot: Slot) -> dict:
        watchdog = self.ctx.watchdogs.get(job_id)
        beat = watchdog.last_beat if watchdog else None
        return {
            "job": job_id, "runner": slot.job.runner, "cpus": slot.permit.cpus, "memory": slot.permit.memory,
            "pids": slot.permit.pids,
            "cpu_cores": beat.cpu_cores if beat else None, "memory_used": beat.memory if beat else None,
            "state": beat.state if beat else None, "idle_for": beat.idle_for if beat else None,
            "last_activity": watchdog.last_activity if watchdog else None,
            "disk_used": watchdog.disk.bytes if watchdog and watchdog.disk else None,
            "disk_limit": slot.job.policy.get("disk"),
        }

    def _write_status(self) -> None:
        view = self.status()
        snapshot.write(self.settings.status_path, view)
        if self.metrics is not None:
            self.metrics.refresh(self.store, view)  # one aggregate query; a scrape reads this snapshot

    def runner_view(self) -> list[dict]:
        """Each runner's state: ok, or cooling down until T; how many of its jobs run and wait."""
        now = utcnow()
        states = self.store.runner_states()
        waiting = self.store.jobs([Status.waiting_retry])
        view = []
        for name in sorted(self.ctx.runners):
            until = states[name].cooldown_until if name in states else None
            cooling = until is not None and until > now
            view.append({
                "runner": name,
                "state": f"cooling down until {until:%Y-%m-%dT%H:%M:%SZ}" if cooling else "ok",
                "cooldown_until": until.isoformat() if cooling else None,
                "reason": states[name].reason if cooling else None,
                "running": sum(1 for slot in self.slots.values() if slot.job.runner == name),
                "waiting": sum(1 for job in waiting if job.runner == name),
            })
        return view

    # -- scheduling -----------------------------------------------------------------------------------

    def _figures(self) -> dict:
        """What this host holds now, for its heartbeat."""
        reserved = self.governor.snapshot()["reserved"]
        return {"reserved_cpus": reserved["cpus"], "reserved_memory": reserved["memory"],
                "running": len(self.slots), "waiting": self.waiting}

    def reap(self) -> None:
        for job_id, slot in list(self.slots.items()):
            if slot.done.is_set() or not slot.thread.is_alive():
                self.governor.release(slot.permit)
                del self.slots[job_id]
                self.ctx.stop_requests.pop(job_id, None)
                self.presence.claim_now = True

    def keep_disk_reserve(self) -> None:
        """When running jobs push the state root's free space below the reserve, stop the largest writer."""
        short = self.governor.disk_short()
        if short is None or any(why == "disk_reserve" for why in self.ctx.stop_requests.values()):
            return
        measured = {job_id: dog.disk.bytes for job_id, dog in self.ctx.watchdogs.items() if dog.disk is not None}
        if not measured:
            return
        largest = max(measured, key=measured.get)
        self.ctx.stop_requests[largest] = "disk_reserve"
        log.warning("disk reserve crossed: stopping the largest writer", extra={
            "action": "disk_reserve", "job": largest, "bytes": measured[largest], "why": short})

    def admit(self) -> None:
        """Claim and start the jobs of this host's queue that fit its budget now (``admission.claim``)."""
        if self.ctx.shutdown.is_set() or not self.presence.claim_due():
            return
        per_runner: dict[str, int] = {}
        for slot in self.slots.values():
            per_runner[slot.job.runner] = per_runner.get(slot.job.runner, 0) + 1
        plan = admission.claim(self.store, self.governor, self.presence.claimer, self.ctx.runners, per_runner,
                               busy=list(self.slots), start=self.start)
        self.presence.claimed(started=bool(plan.starts))
        self.waiting = plan.waiting
        self._explain_queue(per_runner)

    def _explain_queue(self, per_runner: dict[str, int]) -> None:
        """Why the jobs at the head of the queue wait (for ``status``, ``show`` and the page), in words, at most
        once a second (it reads the queue's head and the holding jobs: cheap, but not for every tick)."""
        if time.monotonic() - self._explained < 1.0:
            return
        self._explained = time.monotonic()
        self.held = admission.explain(self.store, self.governor, self.presence.claimer, self.ctx.runners,
                                      per_runner, HELD_SHOWN)

    def start(self, job: Job, permit: Permit, target: Callable | None = None, *args) -> None:
        thread = threading.Thread(target=self._run, args=(target or run_job, job.id, *args),
                                  name=f"job-{job.id}", daemon=True)
        self.slots[job.id] = Slot(job, permit, thread)
        thread.start()

    def _run(self, target, job_id: str, *args) -> None:
        attempt = self.slots[job_id].job.attempts if job_id in self.slots else None
        try:
            target(self.ctx, job_id, *args)
        except IllegalTransition as exc:  # another actor moved the job first (a cancel, a host's take-over)
            log.warning("job moved by another actor: this attempt ends", extra={
                "action": "job_moved", "job": job_id, "error": str(exc)})
        except Exception:  # the job thread's boundary: a bug must fail the job loudly, not hang it
            log.exception("job thread failed", extra={"action": "job_crashed", "job": job_id})
            self._fail_after_crash(job_id, attempt)
        finally:
            if (slot := self.slots.get(job_id)) is not None:
                slot.done.set()  # set before the wake: the woken round frees the slot though the thread lingers
            self.wakeup.wake()  # its slot is free: the loop admits the next job now, not at its next tick

    def _fail_after_crash(self, job_id: str, attempt: int | None) -> None:
        job = self.store.get(job_id)
        if job is None or job.status not in ACTIVE or job.host_id != self.settings.host_id:
            return  # settled, queued again, another host's now, or awaiting review (a person's to decide)
        owner = (self.settings.host_id, attempt if attempt is not None else job.attempts)
        try:
            settle(self.store, job, Workspace.of(self.settings, job),
                   Ending.of(InternalError("the executor hit an internal error; see its log")),
                   Phase(job.status, owner=owner), self.sandbox, self.ctx.settled)
        except (ExecutorError, OSError, DockerException):
            log.exception("cannot settle crashed job", extra={"job": job_id})

