"""Start-up recovery: resolving what a crash of the executor left behind, so nothing is lost or run twice.

Owns the decision for every job of *this host* found mid-flight (the store says which host claimed each;
``recover_job`` is also how the serving loop resolves a job whose attempt lost the engine or the store;
jobs another host took over while this one was lost are no longer its own). First the disks: what a crash
left mounted or bound in this state root's job and probe directories that no job explains is unmounted and
released, and every job's disk image that is not mounted (after a reboot) is mounted again, so each job
finds its layers where they were. Then: an agent container that still
runs is adopted (its stream read again; events already stored are not stored twice); an interrupted test
gate runs again; an interrupted commit is finished (the apply is idempotent; a job in ``committing``
without its upper dir had finished applying; no other host ever touches a committing job); an attempt
whose container is gone is rolled back and re-queued. Every move is fenced by (host, attempt). Then
containers and volumes of this executor that none of its live jobs owns are swept, and job dirs that are
expired, or whose job is now another host's, removed (each image unmounted first). A committing job whose
image cannot be mounted again is not taken for committed: it fails with its change kept.

Must never: run a job twice at once, apply a change twice, recover another host's job, or touch another
executor's objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ..errors import COMMITTED, CommitFailed, Interrupted
from ..job.context import Context
from ..job.pipeline import adopt_job, retest_job
from ..logs import log_state
from ..policy import Policy
from ..sandbox.deployment import LABEL_ATTEMPT, LABEL_ROLE, Deployment
from ..settings import Settings
from ..store import Job, Status, Store
from ..transaction import jobdisk, workspace
from ..transaction.commit import Ending, Phase, finish, settle
from ..transaction.retention import remove_expired
from ..transaction.workspace import Workspace
from .governor import Governor, Permit

log = logging.getLogger(__name__)

#: Statuses in which a job thread owns the job.
ACTIVE = (Status.running, Status.testing, Status.committing)


class Executor(Protocol):
    """What recovery needs of the serving executor."""

    settings: Settings
    store: Store
    sandbox: Deployment
    governor: Governor
    ctx: Context
    slots: dict  # job id -> the serving loop's slot (its permit and thread)

    def start(self, job: Job, permit: Permit, target: Callable | None = None, *args) -> None: ...


def recover(ex: Executor) -> None:
    def mine(status: Status) -> list[Job]:
        return [job for job in ex.store.jobs([status]) if job.host_id == ex.settings.host_id]

    swept = jobdisk.sweep(ex.settings.home)
    attached = jobdisk.attach_all(ex.settings.jobs_dir)
    if swept or attached:
        log.info("job disks recovered", extra={"action": "disk_recovery", "removed": swept, "mounted": attached})
    for status in ACTIVE:
        for job in mine(status):
            recover_job(ex, job)
    live = {job.id for job in ex.store.jobs(ACTIVE) if job.host_id == ex.settings.host_id}
    removed = ex.sandbox.sweep(live)
    remove_expired(ex.settings, ex.store, host_id=ex.settings.host_id)
    if removed:
        log.info("swept leftovers", extra={"action": "sweep", "removed": removed})


def recover_job(ex: Executor, job: Job, cause: str = "the executor stopped") -> None:
    """Resolve one of this host's jobs found mid-flight (at start-up, or once the engine or the store that an
    attempt lost answers again): adopted, tested again, its commit finished, or rolled back and re-queued.
    ``cause``: what cut the attempt short, in words (the job's error if it is re-queued)."""
    if job.status == Status.running:
        _running(ex, job, cause)
    elif job.status == Status.testing:
        _testing(ex, job, cause)
    elif job.status == Status.committing:
        _committing(ex, job)


def _running(ex: Executor, job: Job, cause: str) -> None:
    container = _live_container(ex, job, "agent")
    permit = ex.governor.try_reserve(job.id, Policy(**job.policy)) if container else None
    if container is not None and permit is not None:
        ex.start(job, permit, adopt_job, container)
        return
    log_state(job, "interrupted", job.attempts)
    _settle(ex, job, Interrupted(f"{cause} and the agent's container is gone"), Status.running)


def _testing(ex: Executor, job: Job, cause: str) -> None:
    # A test run is repeatable and its result was not recorded: kill it and run the gate again.
    for container in ex.sandbox.containers(job.id):
        ex.sandbox.remove(container)
    ws = Workspace.of(ex.settings, job)
    workspace.discard_test_view(ex.sandbox, ws)
    permit = ex.governor.try_reserve(job.id, Policy(**job.policy))
    if permit is not None and ws.upper.exists():
        ex.start(job, permit, retest_job)
    else:
        _settle(ex, job, Interrupted(f"{cause} during the tests"), Status.testing)


def _committing(ex: Executor, job: Job) -> None:
    ws = Workspace.of(ex.settings, job)
    # The upper dir is removed only after a complete apply: without it, the commit had finished. An image
    # that could not be mounted again says nothing of the sort.
    if jobdisk.unattached(ws.root):
        ending = Ending.of(CommitFailed(f"the job's disk image {ws.root / jobdisk.IMAGE} could not be mounted "
                                        "again after the executor stopped mid-commit; its change is kept, and "
                                        "the repository may hold part of it"))
    elif ws.upper.exists():
        ending = finish(ex.store, job, ws)
    else:
        ending = Ending(Status.succeeded, COMMITTED)
    settle(ex.store, job, ws, ending, _phase(ex, job, Status.committing), ex.sandbox, ex.ctx.settled)


def _phase(ex: Executor, job: Job, status: Status) -> Phase:
    return Phase(status, owner=(ex.settings.host_id, job.attempts))


def _settle(ex: Executor, job: Job, error: Interrupted, phase: Status) -> None:
    settle(ex.store, job, Workspace.of(ex.settings, job), Ending.of(error), _phase(ex, job, phase), ex.sandbox,
           ex.ctx.settled)


def _live_container(ex: Executor, job: Job, role: str):
    for container in ex.sandbox.containers(job.id, all=False):
        labels = container.labels
        if labels.get(LABEL_ROLE) == role and labels.get(LABEL_ATTEMPT) == str(job.attempts):
            return container
    return None
