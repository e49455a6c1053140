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

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import docker

from . import workspace
from .commit import remove_tree
from .errors import ConfigError, ExecutorError
from .governor import Governor, Permit
from .pipeline import Context, Ending, finish_commit, log_state, run_job, settle, workspace_for
from .policy import Policy, Runner, load_runners
from .sandbox import Sandbox, connect
from .settings import Settings
from .spool import Spool, intake
from .store import Job, Status, Store

log = logging.getLogger(__name__)

ACTIVE = (Status.running, Status.testing, Status.committing)


@dataclass
class Slot:
    job: Job
    permit: Permit
    thread: threading.Thread


class Executor:
    def __init__(self, settings: Settings, secrets: Mapping[str, str],
                 client: docker.DockerClient | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.spool = Spool(settings.spool_dir)
        self.sandbox = Sandbox(client or connect(), settings.sandbox_image)
        self.governor = Governor.from_settings(settings)
        self.ctx = Context(settings=settings, store=self.store, sandbox=self.sandbox,
                           runners=self._load_runners(), secrets=secrets)
        self.slots: dict[str, Slot] = {}
        self.waiting: str | None = None  # why the head of the queue is not running
        self.last_tick = 0.0

    def _load_runners(self) -> dict[str, Runner]:
        try:
            return load_runners(self.settings.policies)
        except ConfigError as exc:
            if hasattr(self, "ctx"):
                log.error("runners.toml unreadable; keeping the previous runners", extra={"error": str(exc)})
                return self.ctx.runners
            raise

    # -- life -----------------------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, then shut down in phases."""
        self.sandbox.check_image()
        self.recover()
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
        self._write_heartbeat()

    def shutdown(self, grace: float = 60.0) -> None:
        """Tell running jobs to stop; they roll back and go back to the queue."""
        self.ctx.shutdown.set()
        deadline = time.monotonic() + grace
        for slot in list(self.slots.values()):
            slot.thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.reap()
        if self.slots:
            log.error("jobs still running after the shutdown grace", extra={"jobs": sorted(self.slots)})
        self.store.close()
        log.info("executor stopped", extra={"action": "stopped"})

    def _write_heartbeat(self) -> None:
        # The container health check reads this: a main loop that stopped ticking is unhealthy.
        path = self.settings.home / "executor.tick"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{self.last_tick:.3f}\n")
        tmp.replace(path)

    # -- recovery -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Resolve what a crash left: re-queue interrupted attempts, finish commits, sweep orphans."""
        for job in self.store.jobs([Status.running, Status.testing]):
            ws = workspace_for(self.settings, job, job.attempts)
            log_state(job, "interrupted", job.attempts)
            settle(self.ctx, job, ws, Ending(Status.queued, "interrupted", "the executor stopped during the attempt"))
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
        if removed:
            log.info("swept leftovers", extra={"action": "sweep", "removed": removed})

    # -- scheduling -----------------------------------------------------------------------------------

    def reap(self) -> None:
        for job_id, slot in list(self.slots.items()):
            if not slot.thread.is_alive():
                self.governor.release(slot.permit)
                del self.slots[job_id]

    def admit(self) -> None:
        """Start queued jobs in priority then arrival order while they fit the budget."""
        if self.ctx.shutdown.is_set():
            return
        self.waiting = None
        busy_workspaces = {slot.job.workspace for slot in self.slots.values()}
        per_runner: dict[str, int] = {}
        for slot in self.slots.values():
            per_runner[slot.job.runner] = per_runner.get(slot.job.runner, 0) + 1
        for job in self.store.jobs([Status.queued]):
            if job.id in self.slots:
                continue
            if job.workspace in busy_workspaces:
                continue  # one job per workspace: a lower dir must not change under a mounted overlay
            runner = self.ctx.runners.get(job.runner)
            if runner and runner.max_concurrent and per_runner.get(job.runner, 0) >= runner.max_concurrent:
                continue
            permit = self.governor.try_reserve(job.id, Policy(**job.policy))
            if permit is None:
                # Strict head-of-line: nothing behind a job that does not fit may overtake it.
                self.waiting = f"job {job.id} waits for the budget: {self.governor.why_not(Policy(**job.policy))}"
                break
            self._start(job, permit)
            busy_workspaces.add(job.workspace)
            per_runner[job.runner] = per_runner.get(job.runner, 0) + 1

    def _start(self, job: Job, permit: Permit) -> None:
        thread = threading.Thread(target=self._run, args=(job.id,), name=f"job-{job.id}", daemon=True)
        self.slots[job.id] = Slot(job, permit, thread)
        thread.start()

    def _run(self, job_id: str) -> None:
        try:
            run_job(self.ctx, job_id)
        except Exception:  # the job thread's boundary: a bug must fail the job loudly, not hang it
            log.exception("job thread failed", extra={"action": "job_crashed", "job": job_id})
            self._fail_after_crash(job_id)

    def _fail_after_crash(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.status.terminal or job.status == Status.queued:
            return
        ws = workspace_for(self.settings, job, job.attempts)
        try:
            settle(self.ctx, job, ws, Ending(Status.failed, "internal",
                                             "the executor hit an internal error; see its log"))
        except (ExecutorError, OSError, docker.errors.DockerException):
            log.exception("cannot settle crashed job", extra={"job": job_id})
