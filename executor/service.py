"""The serving loop: intake, admission, supervision of job threads, start-up recovery and shutdown.

Owns the executor's process-level life. Each tick it takes new job files from the spool, starts the
queued jobs that fit the budget (one thread per job, each holding a governor permit), and reaps
finished threads. At start-up it resolves what a crash left behind: attempts that were running are
rolled back and re-queued, commits in progress are finished, and stray containers and volumes are
swept. Shutdown has phases: stop intake and admission, tell running jobs to stop, wait for them to roll
back and re-queue.

Must never: start a job without a permit, run two jobs on one workspace, or exit with a job thread
still touching a repository.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta, timezone
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import psutil

from . import workspace
from .commit import remove_tree
from .errors import ConfigError, ExecutorError
from .governor import Governor, Permit
from .metrics import serve_metrics
from .notify import Notifier
from .redact import RedactingFilter, Redactor
from .pipeline import (
    Context, Ending, adopt_job, finish_commit, log_state, retest_job, run_job, settle, workspace_for,
)
from .policy import Policy, Runner, load_runners
from .sandbox import LABEL_ATTEMPT, LABEL_ROLE, Sandbox, connect, instance_id
from .settings import Settings
from .spool import Spool, intake
from .store import Job, Status, Store, aware, utcnow
from .web import serve_web, web_url

log = logging.getLogger(__name__)

ACTIVE = (Status.running, Status.testing, Status.committing)
KEPT_FOR_INSPECTION = frozenset({"conflict", "commit_failed"})


@dataclass
class Slot:
    job: Job
    permit: Permit
    thread: threading.Thread


class Executor:
    def __init__(self, settings: Settings, secrets: Mapping[str, str],
                 client: docker.DockerClient | None = None) -> None:
        self.settings = settings
        self.secrets = secrets
        self.redactor = Redactor()
        self.store = Store(settings.db_path, redact=self.redactor)
        self.spool = Spool(settings.spool_dir)
        self.sandbox = Sandbox(client or connect(), settings.sandbox_image, instance_id(settings.home))
        self.governor = Governor.from_settings(settings)
        self.ctx = Context(settings=settings, store=self.store, sandbox=self.sandbox,
                           runners=self._load_runners(), secrets=secrets, redactor=self.redactor)
        self.slots: dict[str, Slot] = {}
        self.waiting: str | None = None  # why the head of the queue is not running
        self.last_tick = 0.0
        self._last_retention = 0.0
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime: the next call measures since now
        self.metrics = None  # the Prometheus endpoint (metrics.ExecutorMetrics) when metrics_port is set
        self.web = None  # the review web page (web.WebServer) when ui_port is set
        for name in ("ui_token", "notify_url"):  # the executor's own secrets: never stored or logged
            value = getattr(settings, name)
            if value is not None:
                self.redactor.update({f"EXECUTOR_{name.upper()}": value.get_secret_value()})
        if settings.notify_url is not None:
            self.ctx.notifier = Notifier(settings.notify_url.get_secret_value(), ui_url=web_url(settings))

    def _load_runners(self) -> dict[str, Runner]:
        try:
            runners = load_runners(self.settings.policies)
            # Whatever a runner's credential is, it is scrubbed from everything stored or logged.
            self.redactor.update({r.auth_env: self.secrets.get(r.auth_env, "") for r in runners.values()})
            return runners
        except ConfigError as exc:
            if hasattr(self, "ctx"):
                log.error("runners.toml unreadable; keeping the previous runners", extra={"error": str(exc)})
                return self.ctx.runners
            raise

    # -- life -----------------------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, then shut down in phases."""
        log_filter = RedactingFilter(self.redactor)
        for handler in logging.getLogger().handlers:
            handler.addFilter(log_filter)
        self.sandbox.check_image()
        self.recover()
        self.metrics = serve_metrics(self.settings, self.store)
        self.web = serve_web(self.settings, self.store)
        log.info("executor serving", extra={"action": "serve", "home": str(self.settings.home)})
        try:
            while not stop.is_set():
                self.tick()
                stop.wait(self.settings.poll_interval)
        finally:
            self.shutdown()

    def tick(self) -> None:
        self.ctx.runners = self._load_runners()
        intake(self.spool, self.store, self.settings, self.ctx.runners)
        self.reap()
        self.admit()
        self.last_tick = time.time()
        if self.last_tick - self._last_retention > 3600:
            self.remove_expired()
        self._write_status()

    def shutdown(self, grace: float = 60.0) -> None:
        """Tell running jobs to stop; they roll back and go back to the queue."""
        self.ctx.shutdown.set()
        if self.web is not None:
            self.web.close()  # no review decision may start while the executor goes down
        deadline = time.monotonic() + grace
        for slot in list(self.slots.values()):
            slot.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.reap()
        if self.slots:
            log.error("jobs still running after the shutdown grace", extra={"jobs": sorted(self.slots)})
        if self.metrics is not None:
            self.metrics.close()
        if self.ctx.notifier is not None:
            self.ctx.notifier.close()
        self.store.close()
        log.info("executor stopped", extra={"action": "stopped"})

    def status(self) -> dict:
        """What ``executor status`` shows: budget, reservations, measured use, running jobs, the queue."""
        snapshot = self.governor.snapshot()
        running = []
        for job_id, slot in list(self.slots.items()):
            watchdog = self.ctx.watchdogs.get(job_id)
            beat = watchdog.last_beat if watchdog else None
            running.append({
                "job": job_id, "runner": slot.job.runner, "cpus": slot.permit.cpus, "memory": slot.permit.memory,
                "pids": slot.permit.pids,
                "cpu_cores": beat.cpu_cores if beat else None, "memory_used": beat.memory if beat else None,
                "state": beat.state if beat else None, "idle_for": beat.idle_for if beat else None,
                "last_activity": watchdog.last_activity if watchdog else None,
            })
        with self._process.oneshot():
            executor_use = {"rss": self._process.memory_info().rss,
                            "cpu_percent": self._process.cpu_percent(None)}
        return {
            **snapshot,
            "ts": time.time(),
            "pid": self._process.pid,
            "measured": {
                "executor": executor_use,
                "jobs": {"cpu_cores": round(sum(r["cpu_cores"] or 0 for r in running), 4),
                         "memory": sum(r["memory_used"] or 0 for r in running)},
                "host": {"memory_available": psutil.virtual_memory().available},
            },
            "running": running,
            "queue_length": len(self.store.jobs([Status.queued])),
            "waiting": self.waiting,
            "runners": self.runner_view(),
        }

    def _write_status(self) -> None:
        # `executor status` and the container health check read this file: a main loop that stopped
        # ticking leaves it stale, which is what "unhealthy" means.
        path = self.settings.status_path
        tmp = path.with_suffix(".tmp")
        snapshot = self.status()
        tmp.write_text(json.dumps(snapshot, indent=2) + "\n")
        tmp.replace(path)
        if self.metrics is not None:
            self.metrics.refresh(self.store, snapshot)  # one aggregate query; a scrape reads this snapshot

    def remove_expired(self) -> None:
        """Job dirs of settled jobs go; those kept for inspection (conflicts) after the retention period."""
        self._last_retention = time.time()
        cutoff = utcnow() - timedelta(seconds=self.settings.retention)
        if not self.settings.jobs_dir.exists():
            return
        for entry in self.settings.jobs_dir.iterdir():
            job = self.store.get(entry.name)
            if job is not None and not job.status.terminal:
                continue
            finished = job.finished_at if job is not None else None
            if finished is not None and finished.tzinfo is None:
                finished = finished.replace(tzinfo=timezone.utc)
            kept = job is not None and job.reason in KEPT_FOR_INSPECTION
            if not kept or finished is None or finished < cutoff:
                remove_tree(entry)
                log.info("removed expired job dir", extra={"action": "retention", "job": entry.name})

    # -- recovery -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Resolve what a crash left: adopt agents that still run, re-run interrupted test gates,
        finish commits, re-queue attempts whose container is gone, sweep orphans."""
        for job in self.store.jobs([Status.running]):
            container = self._live_container(job, "agent")
            permit = self.governor.try_reserve(job.id, Policy(**job.policy)) if container else None
            if container is not None and permit is not None:
                self._start(job, permit, adopt_job, container)
                continue
            ws = workspace_for(self.settings, job, job.attempts)
            log_state(job, "interrupted", job.attempts)
            settle(self.ctx, job, ws, Ending(Status.queued, "interrupted",
                                             "the executor stopped and the agent's container is gone"))
        for job in self.store.jobs([Status.testing]):
            # A test run is repeatable and its result was not recorded: kill it and run the gate again.
            for container in self.sandbox.containers(job.id):
                self.sandbox.remove(container)
            ws = workspace_for(self.settings, job, job.attempts)
            workspace.discard_test_view(self.sandbox, ws)
            permit = self.governor.try_reserve(job.id, Policy(**job.policy))
            if permit is not None and ws.upper.exists():
                self._start(job, permit, retest_job)
            else:
                settle(self.ctx, job, ws, Ending(Status.queued, "interrupted", "the executor stopped during the tests"))
        for job in self.store.jobs([Status.committing]):
            ws = workspace_for(self.settings, job, job.attempts)
            if ws.upper.exists():
                ending = finish_commit(self.ctx, job, ws)
            else:
                # The upper dir is removed only after a complete apply: the commit had finished.
                ending = Ending(Status.succeeded, "committed")
            settle(self.ctx, job, ws, ending)
        live = {job.id for job in self.store.jobs(ACTIVE)}
        removed = self.sandbox.sweep(live)
        self.remove_expired()
        if removed:
            log.info("swept leftovers", extra={"action": "sweep", "removed": removed})

    def _live_container(self, job: Job, role: str):
        for container in self.sandbox.containers(job.id, all=False):
            labels = container.labels
            if labels.get(LABEL_ROLE) == role and labels.get(LABEL_ATTEMPT) == str(job.attempts):
                return container
        return None

    # -- scheduling -----------------------------------------------------------------------------------

    def reap(self) -> None:
        for job_id, slot in list(self.slots.items()):
            if not slot.thread.is_alive():
                self.governor.release(slot.permit)
                del self.slots[job_id]

    def admit(self) -> None:
        """Start queued jobs (and waiting ones whose time has come) in priority then arrival order while
        they fit the budget. A job that does not fit blocks those behind it (no starvation); a job held
        back by its runner's cooldown, its runner's concurrency or its busy workspace does not."""
        if self.ctx.shutdown.is_set():
            return
        self.waiting = None
        now = utcnow()
        candidates = self.store.jobs([Status.queued, Status.waiting_retry])
        # One job per workspace: running jobs hold theirs, and so do jobs waiting to resume on a kept upper.
        holders = {slot.job.workspace: job_id for job_id, slot in self.slots.items()}
        for job in candidates:
            if job.status == Status.waiting_retry:
                holders.setdefault(job.workspace, job.id)
        per_runner: dict[str, int] = {}
        for slot in self.slots.values():
            per_runner[slot.job.runner] = per_runner.get(slot.job.runner, 0) + 1
        cooling = {name: st.cooldown_until for name, st in self.store.runner_states().items()
                   if st.cooldown_until and st.cooldown_until > now}
        for job in candidates:
            if job.id in self.slots:
                continue
            if job.status == Status.waiting_retry and job.retry_at and aware(job.retry_at) > now:
                continue
            if job.runner in cooling:
                continue  # a rate limit is account-wide: the runner rests until its cooldown ends
            if holders.get(job.workspace, job.id) != job.id:
                continue  # a lower dir must not change under a mounted overlay
            runner = self.ctx.runners.get(job.runner)
            if runner and runner.max_concurrent and per_runner.get(job.runner, 0) >= runner.max_concurrent:
                continue
            policy = Policy(**job.policy)
            host = self.governor.host_allows(policy)
            permit = None if host else self.governor.try_reserve(job.id, policy)
            if permit is None:
                # Strict head-of-line: nothing behind a job that does not fit may overtake it.
                self.waiting = f"job {job.id} waits: {host or self.governor.why_not(policy)}"
                break
            self._start(job, permit)
            holders[job.workspace] = job.id
            per_runner[job.runner] = per_runner.get(job.runner, 0) + 1

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

    def _start(self, job: Job, permit: Permit, target=None, *args) -> None:
        thread = threading.Thread(target=self._run, args=(target or run_job, job.id, *args),
                                  name=f"job-{job.id}", daemon=True)
        self.slots[job.id] = Slot(job, permit, thread)
        thread.start()

    def _run(self, target, job_id: str, *args) -> None:
        try:
            target(self.ctx, job_id, *args)
        except Exception:  # the job thread's boundary: a bug must fail the job loudly, not hang it
            log.exception("job thread failed", extra={"action": "job_crashed", "job": job_id})
            self._fail_after_crash(job_id)

    def _fail_after_crash(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.status.terminal or job.status in (Status.queued, Status.awaiting_review):
            return  # a job awaiting review already settled: its kept change is a person's to decide
        ws = workspace_for(self.settings, job, job.attempts)
        try:
            settle(self.ctx, job, ws, Ending(Status.failed, "internal",
                                             "the executor hit an internal error; see its log"))
        except (ExecutorError, OSError, docker.errors.DockerException):
            log.exception("cannot settle crashed job", extra={"job": job_id})
