"""Durable state: jobs, their attempts and the per-session event log, in one SQLite file.

Owns the schema, the job status machine and every read and write of the database. A status changes only
through ``transition``, which updates where the current status is the expected one; when another actor
moved the job first, it raises ``IllegalTransition`` instead of overwriting the truth.

Must never: store a secret (token values never reach this module), or let a terminal status change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Column, event, func, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from .errors import IllegalTransition, InvalidJob


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; every time the store writes is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class Status(str, Enum):
    queued = "queued"
    running = "running"
    testing = "testing"
    committing = "committing"
    succeeded = "succeeded"
    rolled_back = "rolled_back"
    failed = "failed"
    cancelled = "cancelled"
    stalled = "stalled"
    waiting_retry = "waiting_retry"
    awaiting_review = "awaiting_review"  # tests passed; the kept change waits for a person (review.py)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.stalled})

#: Every legal move. ``running``/``testing`` -> ``queued`` is the re-queue of a job whose attempt was
#: interrupted by the executor stopping or crashing (its changes were rolled back first).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.running, Status.cancelled, Status.failed}),
    Status.running: frozenset(
        {Status.testing, Status.rolled_back, Status.failed, Status.cancelled, Status.queued, Status.stalled,
         Status.waiting_retry}
    ),
    # A rate-limited job waits (slot freed, workspace kept) and then runs again against the same runner.
    Status.waiting_retry: frozenset({Status.running, Status.cancelled, Status.failed}),
    Status.testing: frozenset(
        {Status.committing, Status.rolled_back, Status.failed, Status.cancelled, Status.queued,
         Status.awaiting_review}
    ),
    # Review: approve commits (committing), reject rolls back, an approve that meets a conflict fails.
    Status.awaiting_review: frozenset({Status.committing, Status.rolled_back, Status.failed, Status.cancelled}),
    Status.committing: frozenset({Status.succeeded, Status.failed}),
}


class Job(SQLModel, table=True):
    id: str = Field(primary_key=True)
    session_id: str = Field(index=True)
    runner: str
    model_requested: str
    workspace: str
    prompt: str
    policy_name: str
    policy: dict = Field(default_factory=dict, sa_column=Column(JSON))
    test_command: str | None = None
    priority: int = 0
    status: Status = Field(default=Status.queued, index=True)
    reason: str | None = None
    error: str | None = None
    spool_name: str | None = Field(default=None, unique=True)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    start_ns: int | None = None  # time.time_ns() before the attempt's overlay was mounted (conflict check)
    repo_uid: int | None = None
    repo_gid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    models_seen: list = Field(default_factory=list, sa_column=Column(JSON))
    changed_files: list = Field(default_factory=list, sa_column=Column(JSON))
    test_exit_code: int | None = None
    test_output: str | None = None
    final_text: str | None = None
    retry_at: datetime | None = None  # waiting_retry: not before this time
    resume_session: str | None = None  # waiting_retry: the Claude Code session the next attempt resumes
    limited_attempts: int = 0  # attempts ended by a rate limit or overload (count toward max_attempts)
    review_reasons: list = Field(default_factory=list, sa_column=Column(JSON))  # why a person must look
    review_since: datetime | None = None  # when the job began to wait for a person
    reviewed_at: datetime | None = None
    reviewed_by: str | None = None
    review_note: str | None = None
    review_files: list | None = Field(default=None, sa_column=Column(JSON))  # a partial approval's paths
    skills: list | None = Field(default=None, sa_column=Column(JSON))  # skills riding along in full
    context: str | None = None  # "full": the job bypasses compaction
    compaction: str | None = None  # how a follow-up started: model | structural | resume | full (+ why)


class RateLimitEvent(SQLModel, table=True):
    """One rate limit (or overload) met by a runner: what a report counts per 24 hours."""

    id: int | None = Field(default=None, primary_key=True)
    runner: str = Field(index=True)
    job_id: str = Field(index=True)
    attempt: int
    ts: datetime = Field(default_factory=utcnow, index=True)
    kind: str  # rate_limited | overloaded | usage_limit
    status_code: int | None = None
    retry_delay: float | None = None  # seconds the job waited before its next attempt
    message: str = ""


class RunnerState(SQLModel, table=True):
    """A runner's cooldown: a rate limit is account-wide, so no job of the runner starts before it ends."""

    name: str = Field(primary_key=True)
    cooldown_until: datetime | None = None
    reason: str | None = None


class Attempt(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, foreign_key="job.id")
    number: int
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    claude_session_id: str | None = None
    models_seen: list = Field(default_factory=list, sa_column=Column(JSON))
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class Compaction(SQLModel, table=True):
    """One summary in a session brief, beside the event ids of the history it replaced."""

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(index=True)
    job_id: str = Field(index=True)  # the job whose brief it went into
    ts: datetime = Field(default_factory=utcnow)
    kind: str  # file | settled_job | skill
    subject: str  # the path, the earlier job's id, the skill's name
    event_ids: list = Field(default_factory=list, sa_column=Column(JSON))
    source_size: int = 0  # bytes of the history it replaced
    summary_size: int = 0  # bytes of what the brief carries instead
    summary: str = ""
    model: str | None = None  # the model that answered (None: structural, no model)
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    latency: float | None = None  # seconds, retries included
    reused_from: int | None = None  # an earlier row whose summary was reused (no call made)


class Heartbeat(SQLModel, table=True):
    """One look at a running attempt every heartbeat interval: what progress it showed."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    attempt: int
    ts: datetime = Field(default_factory=utcnow)
    state: str  # progress | waiting_api | idle
    new_lines: int = 0
    cpu_cores: float | None = None
    memory: int | None = None
    pids: int | None = None
    idle_for: float = 0.0
    last_activity: str = ""


class Event(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    session_id: str = Field(index=True)
    attempt: int = 0
    line: int | None = None  # the stream line that produced it (adoption after a restart skips up to it)
    ts: datetime = Field(default_factory=utcnow)
    kind: str
    data: dict = Field(default_factory=dict, sa_column=Column(JSON))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (the CLI) run beside the writer; FULL makes a committed row survive power loss.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """Every database operation of the executor."""

    def __init__(self, db_path: Path, redact: Callable[[Any], Any] | None = None) -> None:
        #: applied to every free-text value written (credential values must never be stored)
        self.redact = redact or (lambda value: value)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            f"sqlite:///{db_path}", connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_schema()
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A database made by an older version gains the nullable columns added since (create_all only
        makes missing tables)."""
        with self.engine.begin() as conn:
            for table in SQLModel.metadata.sorted_tables:
                have = {row[1] for row in conn.exec_driver_sql(f'PRAGMA table_info("{table.name}")')}
                for column in table.columns:
                    if have and column.name not in have and column.nullable and not column.primary_key:
                        kind = column.type.compile(dialect=self.engine.dialect)
                        try:
                            conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
                        except OperationalError as exc:  # another process added it a moment ago
                            if "duplicate column" not in str(exc):
                                raise

    def _create_schema(self) -> None:
        # `executor serve` and a CLI command may open a new database at the same moment: the loser of
        # that race sees "table already exists"; the schema is then there, so look again.
        for attempt in range(5):
            try:
                SQLModel.metadata.create_all(self.engine)
                return
            except OperationalError as exc:
                if "already exists" not in str(exc) or attempt == 4:
                    raise

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
            s.add(job)
            try:
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

    def get(self, job_id: str) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def find_by_spool_name(self, name: str) -> Job | None:
        with self.session() as s:
            return s.exec(select(Job).where(Job.spool_name == name)).first()

    def jobs(self, statuses: Iterable[Status] | None = None) -> list[Job]:
        """Jobs in priority, then arrival order (the order admission considers them)."""
        with self.session() as s:
            query = select(Job)
            if statuses is not None:
                query = query.where(col(Job.status).in_([st.value for st in statuses]))
            query = query.order_by(col(Job.priority).desc(), col(Job.created_at), col(Job.id))
            return list(s.exec(query))

    def transition(self, job_id: str, expected: Status | Iterable[Status], new: Status, **fields: Any) -> Job:
        """Move a job from one of ``expected`` to ``new`` (and set ``fields``) or raise IllegalTransition."""
        allowed = {expected} if isinstance(expected, Status) else set(expected)
        sources = [st for st in allowed if new in TRANSITIONS.get(st, frozenset())]
        if not sources:
            raise IllegalTransition(f"job {job_id}: no legal move from {sorted(allowed)} to {new.value}")
        if new.terminal:
            fields.setdefault("finished_at", utcnow())
        with self.session() as s:
            result = s.exec(  # type: ignore[call-overload]
                update(Job)
                .where(col(Job.id) == job_id, col(Job.status).in_([st.value for st in sources]))
                .values(status=new, **self.redact(fields))
            )
            s.commit()
            if result.rowcount != 1:
                current = s.get(Job, job_id)
                now = current.status.value if current else "missing"
                raise IllegalTransition(
                    f"job {job_id}: refused {'/'.join(st.value for st in sources)} -> {new.value}: "
                    f"the job is {now}",
                    job_id=job_id,
                    current=now,
                )
            job = s.get(Job, job_id)
            s.refresh(job)
            return job

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

    # -- attempts -----------------------------------------------------------------------------------

    def start_attempt(self, job_id: str, number: int) -> Attempt:
        with self.session() as s:
            attempt = Attempt(job_id=job_id, number=number)
            s.add(attempt)
            s.commit()
            s.refresh(attempt)
            return attempt

    def finish_attempt(self, attempt_id: int, **fields: Any) -> None:
        with self.session() as s:
            s.exec(  # type: ignore[call-overload]
                update(Attempt).where(col(Attempt.id) == attempt_id).values(finished_at=utcnow(), **self.redact(fields))
            )
            s.commit()

    def attempts(self, job_id: str) -> list[Attempt]:
        with self.session() as s:
            return list(s.exec(select(Attempt).where(Attempt.job_id == job_id).order_by(col(Attempt.number))))

    # -- rate limits and runners ---------------------------------------------------------------------

    def add_rate_limit(self, event: RateLimitEvent) -> None:
        event.message = self.redact(event.message)
        with self.session() as s:
            s.add(event)
            s.commit()

    def rate_limits(self, runner: str | None = None, job_id: str | None = None) -> list[RateLimitEvent]:
        with self.session() as s:
            query = select(RateLimitEvent)
            if runner is not None:
                query = query.where(RateLimitEvent.runner == runner)
            if job_id is not None:
                query = query.where(RateLimitEvent.job_id == job_id)
            return list(s.exec(query.order_by(col(RateLimitEvent.id))))

    def cool_down(self, runner: str, until: datetime, reason: str) -> None:
        """Extend (never shorten) a runner's cooldown."""
        with self.session() as s:
            state = s.get(RunnerState, runner) or RunnerState(name=runner)
            current = aware(state.cooldown_until) if state.cooldown_until else None
            if current is None or until > current:
                state.cooldown_until = until
                state.reason = self.redact(reason)
            s.add(state)
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
        with self.session() as s:
            query = select(Compaction)
            if session_id is not None:
                query = query.where(Compaction.session_id == session_id)
            if job_id is not None:
                query = query.where(Compaction.job_id == job_id)
            return list(s.exec(query.order_by(col(Compaction.id))))

    # -- heartbeats ---------------------------------------------------------------------------------

    def add_heartbeat(self, beat: Heartbeat) -> None:
        beat.last_activity = self.redact(beat.last_activity)
        with self.session() as s:
            s.add(beat)
            s.commit()

    def heartbeats(self, job_id: str) -> list[Heartbeat]:
        with self.session() as s:
            return list(s.exec(select(Heartbeat).where(Heartbeat.job_id == job_id).order_by(col(Heartbeat.id))))

    # -- events -------------------------------------------------------------------------------------

    def add_event(self, job: Job, attempt: int, kind: str, data: dict | None = None) -> None:
        self.add_events(job, attempt, [(kind, data or {})])

    def add_events(self, job: Job, attempt: int, items: list[tuple[str, dict]], line: int | None = None) -> None:
        """Events of one moment, in one transaction (all of a stream line's events or none)."""
        if not items:
            return
        with self.session() as s:
            for kind, data in items:
                s.add(Event(job_id=job.id, session_id=job.session_id, attempt=attempt, kind=kind, line=line,
                            data=self.redact(json.loads(json.dumps(data, default=str)))))
            s.commit()

    def last_stream_line(self, job_id: str, attempt: int) -> int:
        """How many stream lines of an attempt have their events in the store."""
        with self.session() as s:
            value = s.exec(select(func.max(Event.line)).where(Event.job_id == job_id, Event.attempt == attempt)).first()
            return int(value or 0)

    def events(self, job_id: str | None = None, session_id: str | None = None) -> list[Event]:
        with self.session() as s:
            query = select(Event)
            if job_id is not None:
                query = query.where(Event.job_id == job_id)
            if session_id is not None:
                query = query.where(Event.session_id == session_id)
            return list(s.exec(query.order_by(col(Event.id))))
