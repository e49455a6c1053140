"""The tables of the store: jobs, attempts, the per-session event log, heartbeats, rate limits, runner
cooldowns, compaction audit rows, the API requests of sealed jobs and the hosts that share the store
(SQLModel).

Owns the schema as the code sees it; the database gets it through the migrations (``migrations/``), and a
test holds the two equal. Every time column holds UTC (``clock.utcnow``). Numbers that outgrow 32 bits
(bytes, nanoseconds, inodes) are BIGINT, as PostgreSQL needs.

Must never: hold a secret (the store redacts every free-text value it writes), or change without a new
migration revision.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Column, Index
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from ..clock import utcnow
from .status import Status


def _big(**kw) -> Column:
    return Column(BigInteger, **kw)


class Job(SQLModel, table=True):
    id: str = Field(primary_key=True)
    session_id: str = Field(index=True)
    runner: str
    agent: str = "claude-code"  # the runner's agent when the job was accepted (runners.toml ``agent``)
    model_requested: str
    workspace: str
    prompt: str
    policy_name: str
    policy: dict = Field(default_factory=dict, sa_column=Column(JSON))
    test_command: str | None = None
    priority: int = 0
    # Stored by name in a plain VARCHAR on both engines: a new status needs no migration.
    status: Status = Field(default=Status.queued, sa_column=Column(
        SAEnum(Status, native_enum=False, length=32, create_constraint=False), index=True, nullable=False))
    reason: str | None = None
    error: str | None = None
    spool_name: str | None = Field(default=None, unique=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)  # `executor jobs` lists the newest first
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # time.time_ns() before the attempt's overlay was mounted (conflict check)
    start_ns: int | None = Field(default=None, sa_column=_big())
    repo_uid: int | None = None
    repo_gid: int | None = None
    # the repository's device and inode at intake: a swapped one is refused
    workspace_dev: int | None = Field(default=None, sa_column=_big())
    workspace_ino: int | None = Field(default=None, sa_column=_big())
    attempts: int = 0
    cancel_requested: bool = False
    models_seen: list = Field(default_factory=list, sa_column=Column(JSON))
    changed_files: list = Field(default_factory=list, sa_column=Column(JSON))
    test_exit_code: int | None = None
    test_output: str | None = None
    #: the graded gate's record (evaluation = "tests"): kind, verdict, fail-to-pass, broken and flaky tests, runs
    evaluation: dict | None = Field(default=None, sa_column=Column(JSON))
    final_text: str | None = None
    retry_at: datetime | None = None  # waiting_retry: not before this time
    resume_session: str | None = None  # waiting_retry: the agent's session the next attempt resumes
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
    follows: str | None = Field(default=None, index=True)  # the job this one was made from (a retry, a revision)
    builds_on: str | None = None  # the reviewed job whose kept change this one revises (its upper dir moves here)
    # Several hosts (store/queue.py): the policy's hard limits as columns, so a claim picks what fits.
    cpus: float | None = None
    memory: int | None = Field(default=None, sa_column=_big())
    host_id: str | None = Field(default=None, index=True)  # the host that claimed it (its upper dir is there)
    spool_host: str | None = None  # the host whose spool the job file came in through
    # The storage its workspace lies on (intake/storage.py: the root's marker as the accepting host read it):
    # only a host whose root is that storage claims it. None (jobs from before): its path alone decides.
    storage: str | None = None
    # Set while the job holds its workspace and session (running, testing, committing, waiting_retry):
    # unique, so two hosts can never hold one workspace or one session at once.
    workspace_lock: str | None = None
    session_lock: str | None = None
    interrupted_at: datetime | None = None  # its host was found lost (heartbeat older than the host timeout)
    #: policy land = "commit"/"branch": where HEAD was as the job started (mode, ref, base), then where its
    #: change landed (branch, commit, parent, note) and, for a branch landed later, ``landed``
    git: dict | None = Field(default=None, sa_column=Column(JSON))


#: The queue in admission order (priority high first, then arrival): a claim reads it from its head.
Index("ix_job_queue", Job.__table__.c.status, Job.__table__.c.priority.desc(), Job.__table__.c.created_at,
      Job.__table__.c.id)
Index("ux_job_workspace_lock", Job.__table__.c.workspace_lock, unique=True)
Index("ux_job_session_lock", Job.__table__.c.session_lock, unique=True)


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


class ApiRequest(SQLModel, table=True):
    """One request a sealed job's API gateway forwarded, as the API itself answered it (usage and rate-limit
    headers from the response, not from the CLI's own bookkeeping)."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    attempt: int
    runner: str = Field(index=True)
    ts: datetime = Field(default_factory=utcnow, index=True)  # when the response ended
    method: str = "POST"
    path: str
    status: int  # what the container got (502: the upstream could not be reached)
    model: str | None = None  # the model that answered (else the one asked for)
    latency: float  # seconds to the response head
    duration: float  # seconds to the end of the response
    request_bytes: int = 0
    response_bytes: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    rate_limits: dict = Field(default_factory=dict, sa_column=Column(JSON))  # the protocol's rate-limit headers
    request_id: str | None = None
    error: str | None = None  # why the response is incomplete or synthetic, or the API's error message


class RunnerState(SQLModel, table=True):
    """A runner's cooldown: a rate limit is account-wide, so no job of the runner starts before it ends."""

    name: str = Field(primary_key=True)
    cooldown_until: datetime | None = None
    reason: str | None = None


class Attempt(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, foreign_key="job.id")
    number: int
    host_id: str | None = Field(default=None, index=True)  # the host that ran it
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None  # when its agent ended (or the attempt, when it ended before one ran)
    # The attempt's own status (status.py ATTEMPT_OPEN while it lasts; then how it ended) and why it ended.
    status: str | None = "running"
    reason: str | None = None
    outcome: str | None = None  # how its agent's run ended (success, agent_error, rate_limited, ...)
    exit_code: int | None = None
    agent_session_id: str | None = None  # the agent's own session (its id as its stream gave it)
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
    state: str  # progress | api_streaming | waiting_api | idle
    new_lines: int = 0
    cpu_cores: float | None = None
    memory: int | None = Field(default=None, sa_column=_big())
    pids: int | None = None
    idle_for: float = 0.0
    last_activity: str = ""
    disk: int | None = Field(default=None, sa_column=_big())  # bytes the job's writable layers used


class Event(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    session_id: str = Field(index=True)
    attempt: int = 0
    line: int | None = None  # the stream line that produced it (adoption after a restart skips up to it)
    ts: datetime = Field(default_factory=utcnow)
    kind: str
    data: dict = Field(default_factory=dict, sa_column=Column(JSON))


class Host(SQLModel, table=True):
    """One ``executor serve`` sharing the store: what it offers, and when it was last seen alive."""

    id: str = Field(primary_key=True)  # EXECUTOR_HOST_ID
    version: str
    machine: str | None = None  # the hostname it runs on (EXECUTOR_HOST_ID may differ)
    pid: int | None = None
    budget_cpus: float
    budget_memory: int = Field(sa_column=_big(nullable=False))
    reserve_memory: int = Field(sa_column=_big(nullable=False))
    workspace_roots: list = Field(default_factory=list, sa_column=Column(JSON))
    storage: dict | None = Field(default=None, sa_column=Column(JSON))  # each root's storage: {root: identity}
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow)  # written with the database's clock
    stopped_at: datetime | None = None  # a clean shutdown
    lost_at: datetime | None = None  # when another host found its heartbeat too old
    reserved_cpus: float = 0.0  # the permits it holds (as of its last heartbeat)
    reserved_memory: int = Field(default=0, sa_column=_big(nullable=False))
    running: int = 0
    waiting: str | None = None  # why the head of its queue waits
