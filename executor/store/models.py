"""The tables of the store: jobs, attempts, the per-session event log, heartbeats, rate limits, runner
cooldowns, compaction audit rows and the API requests of sealed jobs (SQLModel).

Owns the schema. Every time column holds UTC (``clock.utcnow``).

Must never: hold a secret (the store redacts every free-text value it writes).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from ..clock import utcnow
from .status import Status


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
    created_at: datetime = Field(default_factory=utcnow, index=True)  # `executor jobs` lists the newest first
    started_at: datetime | None = None
    finished_at: datetime | None = None
    start_ns: int | None = None  # time.time_ns() before the attempt's overlay was mounted (conflict check)
    repo_uid: int | None = None
    repo_gid: int | None = None
    workspace_dev: int | None = None  # the repository's device and inode at intake: a swapped one is refused
    workspace_ino: int | None = None
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
    follows: str | None = Field(default=None, index=True)  # the job this one was made from (a retry, a revision)
    builds_on: str | None = None  # the reviewed job whose kept change this one revises (its upper dir moves here)


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
    rate_limits: dict = Field(default_factory=dict, sa_column=Column(JSON))  # retry-after, anthropic-ratelimit-*
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
    state: str  # progress | api_streaming | waiting_api | idle
    new_lines: int = 0
    cpu_cores: float | None = None
    memory: int | None = None
    pids: int | None = None
    idle_for: float = 0.0
    last_activity: str = ""
    disk: int | None = None  # bytes the job's writable layers used


class Event(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    session_id: str = Field(index=True)
    attempt: int = 0
    line: int | None = None  # the stream line that produced it (adoption after a restart skips up to it)
    ts: datetime = Field(default_factory=utcnow)
    kind: str
    data: dict = Field(default_factory=dict, sa_column=Column(JSON))
