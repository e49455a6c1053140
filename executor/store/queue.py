"""The shared queue: claiming the next job for a host, and taking over the jobs of a host that was lost.

Owns the claim. A host first reserves what it has free (the governor's permit), then claims in one
statement the head of *its* queue (queued jobs whose workspace lies under one of its roots on that root's
storage, ``on_roots``: the same path on another host's own disk is another directory; whose runner
is not cooling down and not at its ``max_concurrent`` on this host, whose workspace and session no job
holds) if that head fits what it reserved. On PostgreSQL the head is read ``FOR UPDATE SKIP LOCKED`` (a
row another host is claiming at this instant is passed over, never waited for); on SQLite the database's
single writer does the same. The update is conditional on the status, as every move is, and takes the
workspace and session locks, whose unique indexes refuse a second holder: no job is claimed twice and
no workspace is held by two hosts. A job waiting to retry on this host (its kept upper dir is here) is
resumed before new work. Priority, then arrival order, holds per host; the head that does not fit blocks
the host's queue (head-of-line), it is never overtaken on that host.

A lost host's jobs (``hosts.py`` marks them interrupted) are taken over only by a host holding the same
workspace root on the same storage, only while their host is still lost, and only from running, testing or
waiting_retry: the attempt is rolled back (nothing of it was applied; its upper dir is on the lost host's disk) and the job
re-queued. A job in ``committing`` waits for its own host, whose journal finishes the apply.

Must never: claim a job that does not fit, claim outside the host's roots or on storage it does not see,
or take over a committing job or a job whose host came back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, case, exists, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import col

from ..clock import utcnow
from .models import Attempt, Host, Job, RunnerState
from .status import ATTEMPT_OPEN, INTERRUPTED, Status

#: Statuses in which a job holds its workspace and its session (their locks are set).
HOLDING = frozenset({Status.running, Status.testing, Status.committing, Status.waiting_retry})
#: What another host may take over from a lost one (a committing job waits for its own host).
TAKEN_OVER = (Status.running, Status.testing, Status.waiting_retry)
#: Marked interrupted when their host is lost.
MARKED = (Status.running, Status.testing, Status.committing, Status.waiting_retry)
FIT_SLACK = 1e-9
# The queue's aliases of the job table, made once: an alias builds its column collections when first used,
# which cost more than the whole query when it was made anew for every claim (5 ms a round).
_QUEUED = aliased(Job, name="queued_job")
_HOLDER = aliased(Job, name="holder")
_REVIEWED = aliased(Job, name="reviewed")


#: A host's workspace roots: each root's path with its storage (``intake/storage.py``), or plain paths (whose
#: storage is unknown: they serve only jobs with none recorded).
Roots = Sequence[str] | Mapping[str, str | None]


def under_roots(column: Any, roots: Sequence[str]) -> Any:
    """SQL: ``column`` is one of ``roots`` or lies below one (exact and case-sensitive, on both engines)."""
    tests = []
    for root in (str(r).rstrip("/") or "/" for r in roots):
        below = root.rstrip("/") + "/"  # "/" itself: every absolute path lies below it
        tests.append(or_(column == root, func.substr(column, 1, len(below)) == below))
    return or_(*tests) if tests else false()


def on_roots(table: Any, roots: Roots) -> Any:
    """SQL: the job's workspace lies under one of ``roots`` *on that root's storage*: a job whose storage is
    recorded is this host's only where the root at its path is the same storage (the same path on another
    host's own disk is another directory); a job without one (from before storage was recorded) goes by its
    path alone."""
    pairs = roots.items() if isinstance(roots, Mapping) else ((root, None) for root in roots)
    tests = []
    for root, storage in pairs:
        same = table.storage.is_(None) if storage is None else or_(table.storage.is_(None), table.storage == storage)
        tests.append(and_(under_roots(table.workspace, [root]), same))
    return or_(*tests) if tests else false()


class QueueQueries:
    """Mixed into ``Store``: the claim, the queue's head, and the take-over of a lost host's jobs."""

    engine: Any
    postgres: bool
    session: Any
    redact: Any

    def _db_now(self) -> Any:
        """Now, by the database's clock on PostgreSQL (hosts' clocks may differ), else this host's."""
        return func.now() if self.postgres else utcnow()

    def _db_cutoff(self, seconds: float) -> Any:
        return func.now() - timedelta(seconds=seconds) if self.postgres else utcnow() - timedelta(seconds=seconds)

    def _eligible(self, q: Any, host: str, roots: Roots, saturated: Sequence[str],
                  exclude: Sequence[str]) -> list:
        holder = _HOLDER
        cooling = select(RunnerState.name).where(col(RunnerState.cooldown_until) > self._db_now())
        where = [q.status == Status.queued, on_roots(q, roots), q.runner.not_in(cooling),
                 ~exists().where(holder.workspace_lock == q.workspace),
                 ~exists().where(holder.session_lock == q.session_id)]
        if saturated:
            where.append(q.runner.not_in(list(saturated)))
        if exclude:
            where.append(q.id.not_in(list(exclude)))
        # A reviewer's revision continues a change kept on the reviewed job's host: only that host may run it.
        reviewed = _REVIEWED
        where.append(or_(q.builds_on.is_(None),
                         exists().where(reviewed.id == q.builds_on, reviewed.host_id == host),
                         exists().where(reviewed.id == q.builds_on, reviewed.host_id.is_(None))))
        return where

    def head(self, host: str, roots: Roots, saturated: Sequence[str] = ()) -> Job | None:
        """The job this host would claim next if it fitted (to say why the queue waits)."""
        q = _QUEUED
        with self.session() as s:
            return s.execute(select(q).where(*self._eligible(q, host, roots, saturated, ()))
                          .order_by(q.priority.desc(), q.created_at, q.id).limit(1)).scalars().first()

    def claim(self, host: str, roots: Roots, cpus: float, memory: int, *, saturated: Sequence[str] = (),
              exclude: Sequence[str] = ()) -> Job | None:
        """Claim this host's next job if it fits ``cpus``/``memory``: moved to ``running`` with its attempt
        counted, its host set and its workspace and session locked; None when nothing fits (the head of
        this host's queue waits) or the queue is empty. ``exclude``: jobs whose earlier thread still runs
        here."""
        retry = self._due_retry(host, saturated, exclude)
        if retry is not None:
            return self._claim_retry(retry, host, cpus, memory)
        q = _QUEUED
        head = (select(q.id).where(*self._eligible(q, host, roots, saturated, exclude))
                .order_by(q.priority.desc(), q.created_at, q.id).limit(1))
        if self.postgres:
            head = head.with_for_update(skip_locked=True, of=q)
        now = utcnow()
        statement = (
            update(Job)
            .where(col(Job.id) == head.scalar_subquery(), col(Job.status) == Status.queued,
                   col(Job.cpus) <= cpus + FIT_SLACK, col(Job.memory) <= memory)
            .values(status=Status.running, host_id=host, attempts=col(Job.attempts) + 1,
                    started_at=func.coalesce(col(Job.started_at), now), retry_at=None, resume_session=None,
                    # a revision is judged for conflicts from when the change it continues began
                    start_ns=case((and_(col(Job.builds_on).is_not(None), col(Job.start_ns).is_not(None)),
                                   col(Job.start_ns)), else_=time.time_ns()),
                    workspace_lock=col(Job.workspace), session_lock=col(Job.session_id),
                    interrupted_at=None)
            .returning(Job)
            .execution_options(synchronize_session=False)
        )
        return self._run_claim(statement)

    def _run_claim(self, statement: Any, tries: int = 4) -> Job | None:
        for _ in range(tries):
            with self.session() as s:
                try:
                    job = s.execute(statement).scalars().first()
                    s.commit()
                    return job
                except IntegrityError:
                    # Another host took that job's workspace or session this instant (its lock is committed
                    # now): the same statement passes over it and takes the next head.
                    s.rollback()
        return None

    def _due_retry(self, host: str, saturated: Sequence[str], exclude: Sequence[str]) -> Job | None:
        cooling = select(RunnerState.name).where(col(RunnerState.cooldown_until) > self._db_now())
        now = self._db_now()
        where = [col(Job.status) == Status.waiting_retry, col(Job.host_id) == host,
                 or_(col(Job.retry_at).is_(None), col(Job.retry_at) <= now), col(Job.runner).not_in(cooling)]
        if saturated:
            where.append(col(Job.runner).not_in(list(saturated)))
        if exclude:
            where.append(col(Job.id).not_in(list(exclude)))
        with self.session() as s:
            return s.execute(select(Job).where(*where)
                          .order_by(col(Job.priority).desc(), col(Job.created_at), col(Job.id)).limit(1)).scalars().first()

    def _claim_retry(self, job: Job, host: str, cpus: float, memory: int) -> Job | None:
        """Resume a job waiting on this host (it keeps its locks and, for the resumed conversation, its
        ``resume_session`` and ``start_ns``)."""
        # a resumed conversation, and a revision, are judged from when the changes they continue began
        keep_start = and_(or_(col(Job.resume_session).is_not(None), col(Job.builds_on).is_not(None)),
                          col(Job.start_ns).is_not(None))
        statement = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status) == Status.waiting_retry, col(Job.host_id) == host,
                   col(Job.cpus) <= cpus + FIT_SLACK, col(Job.memory) <= memory)
            .values(status=Status.running, attempts=col(Job.attempts) + 1, retry_at=None, interrupted_at=None,
                    started_at=func.coalesce(col(Job.started_at), utcnow()),
                    start_ns=case((keep_start, col(Job.start_ns)), else_=time.time_ns()))
            .returning(Job)
            .execution_options(synchronize_session=False)
        )
        return self._run_claim(statement)

    def due_retry(self, host: str, saturated: Sequence[str] = (), exclude: Sequence[str] = ()) -> Job | None:
        """The job waiting to retry on this host that is due now (it goes before new work)."""
        return self._due_retry(host, saturated, exclude)

    # -- a lost host's jobs --------------------------------------------------------------------------

    def orphans(self, host: str, roots: Roots, timeout: float) -> list[Job]:
        """Jobs of lost hosts (marked interrupted, their host still silent) that this host may take over."""
        stale = select(Host.id).where(col(Host.last_seen) < self._db_cutoff(timeout))
        with self.session() as s:
            return list(s.execute(select(Job).where(
                col(Job.interrupted_at).is_not(None), col(Job.status).in_([st.name for st in TAKEN_OVER]),
                col(Job.host_id) != host, col(Job.host_id).in_(stale), on_roots(Job, roots))
                .order_by(col(Job.priority).desc(), col(Job.created_at), col(Job.id))).scalars())

    def take_over(self, job: Job, host: str, timeout: float) -> Job | None:
        """Roll back a lost host's attempt and re-queue the job, if it is still exactly as read and its host
        is still silent; None when someone (its host, come back) moved first."""
        if job.status not in TAKEN_OVER:
            return None  # a committing job waits for its own host, whose journal finishes the apply
        lost = job.host_id
        error = (f"host {lost} was lost (no heartbeat for {timeout:g}s) during attempt {job.attempts}; "
                 f"rolled back and re-queued by host {host} (nothing of the attempt was applied)")
        silent = exists().where(col(Host.id) == lost, col(Host.last_seen) < self._db_cutoff(timeout))
        statement = (
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status) == job.status,
                   col(Job.status).in_([st.name for st in TAKEN_OVER]), col(Job.host_id) == lost,
                   col(Job.attempts) == job.attempts, col(Job.interrupted_at).is_not(None), silent)
            .values(status=Status.queued, host_id=None, workspace_lock=None, session_lock=None,
                    interrupted_at=None, resume_session=None, retry_at=None, reason="interrupted",
                    error=self.redact(error))
            .returning(Job)
            .execution_options(synchronize_session=False)
        )
        with self.session() as s:
            moved = s.execute(statement).scalars().first()
            if moved is not None:
                s.execute(update(Attempt).where(col(Attempt.job_id) == job.id, col(Attempt.number) == job.attempts,
                                                col(Attempt.status).in_(ATTEMPT_OPEN))
                          .values(finished_at=func.coalesce(col(Attempt.finished_at), utcnow()),
                                  outcome=func.coalesce(col(Attempt.outcome), "host_lost"),
                                  status=INTERRUPTED, reason="host_lost"))
                self._notify(s, "1")  # type: ignore[attr-defined]
            s.commit()
            return moved
