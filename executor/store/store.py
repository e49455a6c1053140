"""Durable state: every read and write of the database (jobs, attempts, the per-session event log).

Owns the engine and every query; the tables are ``models.py``, the status machine ``status.py``, the
schema's versions ``schema.py``, the queries of the shared queue, of the hosts and of the attempts
``queue.py``, ``hosts.py`` and ``attempts.py`` (mixed into ``Store``), the report's and the metrics'
aggregates ``aggregates.py``. A status changes only through ``transition`` (or a claim), which updates
where the current status is the expected one, and, for a job's owner, where the job is still the owner's
attempt (``owner``: host and attempt number); when another actor moved the job first, it raises
``IllegalTransition`` instead of overwriting the truth. A job leaving the statuses that hold its
workspace and session gives up their locks in the same statement, and its current attempt moves (or ends)
with it in the same transaction.

Must never: store a secret (token values never reach this module), or let a terminal status change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, or_, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ..clock import aware, utcnow
from ..errors import IllegalTransition, InvalidJob
from . import schema
from .aggregates import AggregateQueries
from .attempts import AttemptQueries
from .engine import CHANNEL, is_postgres, make_engine, sqlite_url
from .hosts import HostQueries
from .models import Compaction, Event, Heartbeat, Job, RateLimitEvent, RunnerState
from .queue import HOLDING, QueueQueries
from .sealed import SealedQueries
from .status import TRANSITIONS, Status

#: Moves that hand work to another host or free a workspace: idle hosts are woken (PostgreSQL NOTIFY).
_WAKES = frozenset(Status) - HOLDING


class Store(QueueQueries, HostQueries, AttemptQueries, AggregateQueries, SealedQueries):
    """Every database operation of the executor."""

    def __init__(self, target: Path | str, redact: Callable[[Any], Any] | None = None) -> None:
        """``target``: a SQLite file's path, or a database URL (``EXECUTOR_DATABASE_URL``). The schema is
        brought to the code's revision (or refused when it is newer: ``SchemaTooNew``)."""
        #: applied to every free-text value written (credential values must never be stored)
        self.redact = redact or (lambda value: value)
        self.url = sqlite_url(target) if isinstance(target, Path) else target
        self.engine = make_engine(self.url)
        self.postgres = is_postgres(self.engine)
        schema.ensure(self.engine)

    def _notify(self, s: Session, payload: str = "") -> None:
        """Wake the hosts that LISTEN, when this transaction commits: a NOTIFY on PostgreSQL; on SQLite the
        store's wake file (``wake_path``) is written once it committed, which the serving loop watches."""
        if self.postgres:
            s.exec(text("SELECT pg_notify(:channel, :payload)").bindparams(channel=CHANNEL, payload=payload))  # type: ignore[call-overload]
        elif self.wake_path is not None:
            event.listen(s, "after_commit", self._touch_wake, once=True)

    @property
    def wake_path(self) -> Path | None:
        """SQLite: the file written after each commit that brings new work (None on PostgreSQL)."""
        database = None if self.postgres else make_url(self.url).database
        return Path(f"{database}-wake") if database else None

    def _touch_wake(self, _session: Session) -> None:
        try:  # opened and closed for writing: the watcher's IN_CLOSE_WRITE; nothing is written into it
            os.close(os.open(self.wake_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError:
            pass  # the serving loop looks at the queue every EXECUTOR_CLAIM_POLL seconds anyway

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------------------

    def add_job(self, job: Job) -> Job:
        """Insert a new job; a second job with the same id is refused (never run twice)."""
        with self.session() as s:
            s.add(_with_limits(job))
            try:
                self._notify(s, "1")
                s.commit()
            except IntegrityError:
                s.rollback()
                existing = s.get(Job, job.id)
                if existing is not None:
                    raise InvalidJob(
                        f"a job with id {job.id!r} already exists (status {existing.status.value}); "
                        "job ids are unique: remove 'id' to get a generated one or choose another"
                    ) from None
                raise
        return job

    def add_jobs(self, jobs: list[Job]) -> dict[int, InvalidJob]:
        """Insert new jobs in one transaction; returns the refused ones (an id already taken) by their index in
        ``jobs``. A batch with a refused job is inserted job by job, so the others still get in."""
        if not jobs:
            return {}
        with self.session() as s:
            s.add_all([_with_limits(job) for job in jobs])
            try:
                self._notify(s, str(len(jobs)))
                s.commit()
                return {}
            except IntegrityError:
                s.rollback()
        refused = {}
        for index, job in enumerate(jobs):
            try:
                self.add_job(Job(**job.model_dump()))  # a fresh row: the failed session's objects are spent
            except InvalidJob as exc:
                refused[index] = exc
        return refused

    def add_rejected(self, job: Job) -> None:
        """Record a job file refused at intake (status ``rejected``); an id taken meanwhile keeps its job."""
        job.finished_at = job.finished_at or utcnow()
        try:
            self.add_job(job)
        except InvalidJob:
            pass

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def find_by_spool_name(self, name: str) -> Job | None:
        with self.session() as s:
            return s.exec(select(Job).where(Job.spool_name == name)).first()

    def jobs(self, statuses: Iterable[Status] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs in priority, then arrival order (the order admission considers them); at most ``limit``."""
        with self.session() as s:
            query = select(Job)
            if statuses is not None:
                query = query.where(col(Job.status).in_([st.value for st in statuses]))
            query = query.order_by(col(Job.priority).desc(), col(Job.created_at), col(Job.id))
            if limit:
                query = query.limit(limit)
            return list(s.exec(query))

    def job_list(self, statuses: Iterable[Status] | None = None, host: str | None = None,
                 limit: int | None = None) -> list[Any]:
        """A light listing in admission order: rows of id, status, runner, host_id, session_id, reason and
        created_at only (no prompt, policy or output is loaded: ``executor jobs`` stays quick at 100k jobs)."""
        query = select(Job.id, Job.status, Job.runner, Job.host_id, Job.session_id, Job.reason, Job.created_at)
        if statuses is not None:
            query = query.where(col(Job.status).in_([st.name for st in statuses]))
        if host is not None:
            query = query.where(col(Job.host_id) == host)
        query = query.order_by(col(Job.priority).desc(), col(Job.created_at), col(Job.id))
        if limit:
            query = query.limit(limit)
        with self.session() as s:
            return list(s.execute(query).all())

    def transition(self, job_id: str, expected: Status | Iterable[Status], new: Status, *,
                   owner: tuple[str, int] | None = None, add: Job | None = None, **fields: Any) -> Job:
        """Move a job from one of ``expected`` to ``new`` (and set ``fields``) or raise IllegalTransition.
        ``owner`` (host, attempt): the move is refused unless the job is still that host's attempt (a host
        found lost may have had the job taken over meanwhile). ``add``: a new job inserted in the same
        transaction (a reviewer's follow-up exists exactly when the reviewed job ended for it)."""
        allowed = {expected} if isinstance(expected, Status) else set(expected)
        sources = [st for st in allowed if new in TRANSITIONS.get(st, frozenset())]
        if not sources:
            raise IllegalTransition(f"job {job_id}: no legal move from {sorted(allowed)} to {new.value}")
        if new.terminal:
            fields.setdefault("finished_at", utcnow())
        if new not in HOLDING:
            fields.update(workspace_lock=None, session_lock=None)
        where = [col(Job.id) == job_id, col(Job.status).in_([st.name for st in sources])]
        if owner is not None:
            where += [col(Job.host_id) == owner[0], col(Job.attempts) == owner[1]]
        with self.session() as s:
            result = s.exec(update(Job).where(*where).values(status=new, **self.redact(fields)))  # type: ignore[call-overload]
            if result.rowcount == 1:  # the job's current attempt moves with it, or ends with it
                self._follow_attempt(s, job_id, new, fields.get("reason"))
            if result.rowcount == 1 and add is not None:
                s.add(add)
            if result.rowcount == 1 and (new in _WAKES or add is not None):
                self._notify(s)
            s.commit()
            if result.rowcount != 1:
                current = s.get(Job, job_id)
                now = current.status.value if current else "missing"
                held = f" (host {current.host_id}, attempt {current.attempts})" if current and owner else ""
                raise IllegalTransition(
                    f"job {job_id}: refused {'/'.join(st.value for st in sources)} -> {new.value}"
                    f"{f' for host {owner[0]} attempt {owner[1]}' if owner else ''}: the job is {now}{held}",
                    job_id=job_id,
                    current=now,
                )
            job = s.get(Job, job_id)
            s.refresh(job)
            return job

    def followers(self, job_id: str) -> list[Job]:
        """The jobs made from this one (retries, revisions), oldest first."""
        with self.session() as s:
            return list(s.exec(select(Job).where(col(Job.follows) == job_id).order_by(col(Job.created_at))).all())

    def counts(self) -> dict[Status, int]:
        with self.session() as s:
            rows = s.exec(select(Job.status, func.count()).group_by(Job.status)).all()
            return {Status(st): n for st, n in rows}

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Set fields that are not the status (the status moves only through ``transition``)."""
        if "status" in fields:
            raise ValueError("use transition() to change a job's status")
        with self.session() as s:
            s.exec(update(Job).where(col(Job.id) == job_id).values(**self.redact(fields)))  # type: ignore[call-overload]
            s.commit()

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once; flag a running one so its supervisor stops it."""
        job = self.get(job_id)
        if job is None:
            raise InvalidJob(f"no job {job_id!r}")
        if job.status.terminal:
            return job
        if job.status in (Status.queued, Status.waiting_retry, Status.awaiting_review):
            try:
                return self.transition(job_id, job.status, Status.cancelled, reason="cancelled",
                                       error="cancelled before it started" if job.status == Status.queued
                                       else "cancelled while it awaited review (its change was discarded)"
                                       if job.status == Status.awaiting_review
                                       else "cancelled while it waited to retry")
            except IllegalTransition:
                pass  # it started meanwhile: flag it like a running job
        self.update_job(job_id, cancel_requested=True)
        return self.get(job_id)  # type: ignore[return-value]

    def _rows(self, table: Any, order: Any, **filters: Any) -> list:
        """Rows of ``table`` matching every filter that is not None, in ``order``."""
        with self.session() as s:
            query = select(table)
            for name, value in filters.items():
                if value is not None:
                    query = query.where(getattr(table, name) == value)
            return list(s.exec(query.order_by(col(order))))

    # -- rate limits and runners ---------------------------------------------------------------------

    def add_rate_limit(self, event: RateLimitEvent) -> None:
        event.message = self.redact(event.message)
        with self.session() as s:
            s.add(event)
            s.commit()

    def settle_rate_limit(self, job_id: str, attempt: int, **fields: Any) -> bool:
        """Complete the last rate-limit row the gateway wrote for an attempt (the wait decided, the kind it
        turned out to be); False when there is none (an unsealed attempt: add one instead)."""
        with self.session() as s:
            row = s.exec(select(RateLimitEvent)
                         .where(RateLimitEvent.job_id == job_id, RateLimitEvent.attempt == attempt)
                         .order_by(col(RateLimitEvent.id).desc())).first()
            if row is None:
                return False
            for name, value in self.redact(fields).items():
                setattr(row, name, value)
            s.add(row)
            s.commit()
            return True

    def rate_limits(self, runner: str | None = None, job_id: str | None = None) -> list[RateLimitEvent]:
        return self._rows(RateLimitEvent, RateLimitEvent.id, runner=runner, job_id=job_id)

    def cool_down(self, runner: str, until: datetime, reason: str) -> None:
        """Extend (never shorten) a runner's cooldown. One statement: several jobs and hosts see the same
        account's 429 at once, and a read-then-write would race (a duplicate row, or a longer cooldown
        overwritten by a shorter one)."""
        if self.postgres:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        table, reason = RunnerState.__table__, self.redact(reason)
        statement = insert(table).values(name=runner, cooldown_until=until, reason=reason).on_conflict_do_update(
            index_elements=[table.c.name], set_={"cooldown_until": until, "reason": reason},
            where=or_(table.c.cooldown_until.is_(None), table.c.cooldown_until < until))
        with self.session() as s:
            s.execute(statement)
            s.commit()

    def runner_states(self) -> dict[str, RunnerState]:
        with self.session() as s:
            states = {}
            for state in s.exec(select(RunnerState)):
                if state.cooldown_until is not None:
                    state.cooldown_until = aware(state.cooldown_until)
                states[state.name] = state
            return states

    # -- session compaction ---------------------------------------------------------------------------

    def session_jobs(self, session_id: str) -> list[Job]:
        """The jobs of a session in arrival order."""
        with self.session() as s:
            query = select(Job).where(Job.session_id == session_id).order_by(col(Job.created_at), col(Job.id))
            return list(s.exec(query))

    def add_compactions(self, rows: list[Compaction]) -> None:
        with self.session() as s:
            for row in rows:
                row.summary = self.redact(row.summary)
                s.add(row)
            s.commit()

    def compactions(self, session_id: str | None = None, job_id: str | None = None) -> list[Compaction]:
        return self._rows(Compaction, Compaction.id, session_id=session_id, job_id=job_id)

    # -- heartbeats ---------------------------------------------------------------------------------

    def add_heartbeat(self, beat: Heartbeat) -> None:
        beat.last_activity = self.redact(beat.last_activity)
        with self.session() as s:
            s.add(beat)
            s.commit()

    def heartbeats(self, job_id: str) -> list[Heartbeat]:
        return self._rows(Heartbeat, Heartbeat.id, job_id=job_id)

    # -- events -------------------------------------------------------------------------------------

    def add_event(self, job: Job, attempt: int, kind: str, data: dict | None = None) -> None:
        self.add_events(job, attempt, [(kind, data or {})])

    def add_events(self, job: Job, attempt: int, items: list[tuple[str, dict]], line: int | None = None) -> None:
        """Events of one moment, in one transaction (all of a stream line's events or none)."""
        if items:
            self.add_stream_events(job, attempt, [(line, items)])

    def add_stream_events(self, job: Job, attempt: int, lines: list[tuple[int | None, list[tuple[str, dict]]]]) -> None:
        """The events of consecutive stream lines (line number, its events), in one transaction."""
        with self.session() as s:
            for line, items in lines:
                for kind, data in items:
                    s.add(Event(job_id=job.id, session_id=job.session_id, attempt=attempt, kind=kind, line=line,
                                data=self.redact(json.loads(json.dumps(data, default=str)))))
            s.commit()

    def last_stream_line(self, job_id: str, attempt: int) -> int:
        """How many stream lines of an attempt have their events in the store."""
        with self.session() as s:
            value = s.exec(select(func.max(Event.line)).where(Event.job_id == job_id, Event.attempt == attempt)).first()
            return int(value or 0)

    def events(self, job_id: str | None = None, session_id: str | None = None, after: int = 0) -> list[Event]:
        """Events in order; ``after``: only those with a larger id (to follow a log as it grows)."""
        if not after:
            return self._rows(Event, Event.id, job_id=job_id, session_id=session_id)
        with self.session() as s:
            query = select(Event).where(col(Event.id) > after)
            if job_id is not None:
                query = query.where(Event.job_id == job_id)
            if session_id is not None:
                query = query.where(Event.session_id == session_id)
            return list(s.exec(query.order_by(col(Event.id))))


def _with_limits(job: Job) -> Job:
    """The job with its policy's hard limits as columns (a claim compares them with what is free)."""
    if job.cpus is None or job.memory is None:
        from ..policy import Policy

        try:
            policy = Policy(**(job.policy or {}))
        except Exception:  # noqa: BLE001 - a policy stored by an older version: its defaults then
            policy = Policy()
        job.cpus = job.cpus if job.cpus is not None else policy.cpus
        job.memory = job.memory if job.memory is not None else policy.memory
    return job
