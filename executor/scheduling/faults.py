"""Faults of the machine around the executor, and how the serving loop lives with them: the container engine
away, the store away, the state root's file system full.

Owns ``LoopFaults``, the part of the serving loop (mixed into ``service.Executor``) that meets them: a step of
the round that finds the store away (``store.health.unavailable``) or the state root full records it and
the round goes on (the step is tried again with the store's backoff); a job thread that ends because the
engine or the store failed under it (``EngineUnavailable``, ``StoreUnavailable``, ``Unsettled``, or any
error while the engine was lost) hands its job to ``unsettled.py`` instead of failing it, and only a bug
fails a job ``internal`` (held too when even that cannot be recorded); the engine's comings and goings wake
the loop. Also the words and the shape in which the snapshot carries these faults: an ``engine``, a
``store`` and an ``unsettled`` section and one problem line each.

Must never: fail a job for a fault of the machine, let a job thread end with its job owned by no one, or
hide a bug (an error that is no fault of the machine is raised).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import (
    EngineUnavailable,
    IllegalTransition,
    InternalError,
    StoreUnavailable,
    Unsettled,
)
from ..sandbox.disk import free_bytes
from ..sandbox.health import EngineHealth, engine_error
from ..settings import human_size
from ..store.health import StoreHealth, unavailable
from ..transaction.commit import Ending, Phase, settle
from ..transaction.workspace import Workspace
from . import snapshot
from .recovery import ACTIVE
from .unsettled import UnsettledJobs

log = logging.getLogger(__name__)


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says a file system (the state root's) has no room left."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_problem(home: Path, error: BaseException | None = None) -> str:
    try:
        free = human_size(free_bytes(home))
    except OSError:
        free = "unknown"
    why = f"; {error.strerror}" if isinstance(error, OSError) and error.strerror else ""
    return (f"the state root's file system is full ({free} free under {home}{why}): no job starts until there "
            "is room; free space under the state root")


def machine_view(engine: Any, store: Any, unsettled: Any, disk: str | None) -> dict[str, Any]:
    """The snapshot's sections about the machine, and its problem lines."""
    problems = []
    if engine.reason():
        problems.append(f"{engine.reason()} ({engine.error}): no job starts until it answers; running jobs "
                        "wait for it and are adopted or re-queued when it is back")
    problems += [why for why in (store.reason(), disk) if why]
    problems += unsettled.problems()
    return {"engine": engine.view(), "store": store.view(), "unsettled": unsettled.view(), "problems": problems}


class LoopFaults:
    """Mixed into the serving loop (``service.Executor``), whose attributes it uses."""

    settings: Any
    store: Any
    sandbox: Any
    governor: Any
    ctx: Any
    slots: dict
    engine: Any
    store_health: Any
    unsettled: Any
    wakeup: Any
    disk_problem: str | None
    _store_failed: bool
    _sweep_due: bool
    _explained: float
    runner_view: Callable[[], list]

    def _watch_machine(self, client: Any) -> None:
        """The engine's health (``client`` None: a fake deployment, whose engine always answers), the store's,
        and the jobs held unsettled."""
        self.engine = EngineHealth.of(client, on_change=self._engine_changed) if client else EngineHealth()
        self.store_health = StoreHealth()
        self.unsettled = UnsettledJobs()
        self.disk_problem = None  # why the state root's file system is full
        self._store_failed = False  # a step of this round found the store away
        self._sweep_due = False  # the engine came back: sweep what its outage left
        self._counts: dict = {}
        self._runners: list = []

    def _store_view(self) -> tuple[dict, list]:
        """The job counts and the runners' states, or their last values while the store is away."""
        counts, runners = self._guarded(self.store.counts), self._guarded(self.runner_view)
        self._counts = counts if counts is not None else self._counts
        self._runners = runners if runners is not None else self._runners
        return self._counts, self._runners

    def _guarded(self, work: Callable, *args: Any) -> Any:
        """One step of the round that needs the store: skipped while the store is away (until its next try);
        a fault of the machine is recorded and the round goes on (nothing is half done: intake and claims are
        single transactions, the spool keeps what the store did not take). A bug is raised."""
        if not self.store_health.due():
            return None
        try:
            return work(*args)
        except Exception as exc:
            if unavailable(exc):
                self._store_failed = True
                self.store_health.failed(exc)
            elif disk_full(exc):
                self.disk_problem = disk_full_problem(self.settings.home, exc)
            elif not (engine_error(exc) and not self.engine.probe()):
                raise
            return None

    def _write_snapshot(self, view: dict) -> None:
        """The status file; a full state root keeps the last one (and says so in the next that fits)."""
        try:
            snapshot.write(self.settings.status_path, view)
            self.disk_problem = None
        except OSError as exc:
            if not disk_full(exc):
                raise
            self.disk_problem = disk_full_problem(self.settings.home, exc)

    def _engine_changed(self) -> None:
        """The engine went away or came back (the watch thread): explain, try the held jobs and sweep at once."""
        self._explained = 0.0
        self._sweep_due = self._sweep_due or self.engine.reachable
        self.unsettled.wake()
        self.wakeup.wake()

    def _sweep_after_outage(self) -> None:
        """Once the engine is back, what an outage left of this executor's that no live job of this host owns
        goes, as at start-up (on the loop's thread: no claim runs meanwhile)."""
        if not (self._sweep_due and self.engine.reachable):
            return
        self._sweep_due = False
        live = {job.id for job in self.store.jobs(ACTIVE) if job.host_id == self.settings.host_id} | set(self.slots)
        try:
            removed = self.sandbox.sweep(live)
        except Exception as exc:  # noqa: BLE001 - what is left stays for the next sweep
            if not engine_error(exc):
                raise
            log.warning("sweep after the engine's outage failed", extra={"action": "sweep", "error": str(exc)[:300]})
            return
        if removed:
            log.info("swept what the engine's outage left", extra={"action": "sweep", "removed": removed})

    def _let_go_of_held(self) -> None:
        """At shutdown: jobs held unsettled stay in the store as they are; the next start's recovery resolves
        them."""
        for job_id in self.unsettled.release_all():
            slot = self.slots.pop(job_id, None)
            if slot is not None:
                self.governor.release(slot.permit)
            log.warning("held job left for recovery at the next start", extra={"action": "shutdown", "job": job_id})

    # -- a job thread's end --------------------------------------------------------------------------------

    def _run(self, target: Callable, job_id: str, *args: Any) -> None:
        """A job thread: the job is settled, moved by another actor, held (the machine failed), or failed
        ``internal`` (a bug)."""
        attempt = self.slots[job_id].job.attempts if job_id in self.slots else 0
        since = self.engine.epoch
        try:
            target(self.ctx, job_id, *args)
        except IllegalTransition as exc:  # another actor moved the job first (a cancel, a host's take-over)
            log.warning("job moved by another actor: this attempt ends", extra={
                "action": "job_moved", "job": job_id, "error": str(exc)})
        except (EngineUnavailable, StoreUnavailable, Unsettled) as exc:  # the machine failed, not the job
            if isinstance(exc, EngineUnavailable):
                self.engine.probe()  # admission pauses at once if the engine is away (the watch may lag)
            self.ctx.stop_requests.pop(job_id, None)  # its thread is done: the loop may ask another to stop
            self.unsettled.hold(job_id, attempt, exc)
        except Exception as exc:  # the job thread's boundary: a bug must fail the job loudly, not hang it
            if unavailable(exc):
                self.unsettled.hold(job_id, attempt, StoreUnavailable(str(exc)))
            elif self.engine.epoch != since or (engine_error(exc) and not self.engine.probe()):
                self.unsettled.hold(job_id, attempt, EngineUnavailable(str(exc)))
            else:
                log.exception("job thread failed", extra={"action": "job_crashed", "job": job_id})
                self._fail_after_crash(job_id, attempt)
        finally:
            if (slot := self.slots.get(job_id)) is not None:
                slot.done.set()  # set before the wake: the woken round frees the slot though the thread lingers
            self.wakeup.wake()  # its slot is free: the loop admits the next job now, not at its next tick

    def _fail_after_crash(self, job_id: str, attempt: int) -> None:
        """Fail a crashed job ``internal``; when that cannot be recorded, the job is held until it can."""
        ending = Ending.of(InternalError("the executor hit an internal error; see its log"))
        try:
            job = self.store.get(job_id)
        except Exception as exc:  # not even its row: resolve it as recovery would, later
            self.unsettled.hold(job_id, attempt, StoreUnavailable(f"cannot read the crashed job: {exc}"))
            return
        if job is None or job.status not in ACTIVE or job.host_id != self.settings.host_id:
            return  # settled, queued again, another host's now, or awaiting review (a person's to decide)
        try:
            settle(self.store, job, Workspace.of(self.settings, job), ending,
                   Phase(job.status, owner=(self.settings.host_id, attempt or job.attempts)), self.sandbox,
                   self.ctx.settled)
        except IllegalTransition:
            pass
        except Exception as exc:  # noqa: BLE001 - the store or the engine is away: the job stays this host's
            self.unsettled.hold(job_id, attempt, Unsettled(f"cannot record the crash: {exc}", ending, job.status))
