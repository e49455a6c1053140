"""Admission: which queued jobs start now, in what order, and why the head of the queue waits.

Owns the order rule. Queued jobs (and waiting ones whose retry time has come) are considered in priority,
then arrival order. Admission is strict head-of-line: when the first job that could run does not fit the
budget (or the host's available memory), nothing behind it starts ahead of it, so a big job is never
starved by a stream of small ones. A job held back by its runner's cooldown, its runner's
``max_concurrent``, its busy workspace or its busy session does not block the others (one job of a session
runs at a time: its home's committed state is the lower dir of the running job's home).

Every job left waiting gets its reason in words (``Plan.held``), which ``status``, ``show`` and the page show.

Must never: start anything (it returns the plan and the permits it took), or read the environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from ..clock import aware
from ..policy import Policy, Runner
from ..store import Job, Status
from .governor import Governor, Permit


@dataclass
class Plan:
    """What to start now (each with its permit, already reserved), why the queue's head waits, and why each
    job that does not start waits (by job id)."""

    starts: list[tuple[Job, Permit]] = field(default_factory=list)
    waiting: str | None = None
    held: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Running:
    """What admission needs to know of a running job."""

    runner: str
    workspace: str
    session: str = ""


def plan(candidates: Iterable[Job], running: Mapping[str, Running], runners: Mapping[str, Runner],
         cooling: Iterable[str], governor: Governor, now: datetime) -> Plan:
    """The jobs among ``candidates`` (in admission order) that start now."""
    candidates = list(candidates)
    cooling = set(cooling)
    result = Plan()
    # One job per workspace and per session: running jobs hold theirs, and so do jobs waiting to resume
    # on a kept upper dir and home layer.
    holders = {r.workspace: job_id for job_id, r in running.items()}
    holders.update({("session", r.session): job_id for job_id, r in running.items() if r.session})
    for job in candidates:
        if job.status == Status.waiting_retry:
            holders.setdefault(job.workspace, job.id)
            holders.setdefault(("session", job.session_id), job.id)
    per_runner: dict[str, int] = {}
    for r in running.values():
        per_runner[r.runner] = per_runner.get(r.runner, 0) + 1
    blocked_by: str | None = None  # the head-of-line job that does not fit the budget
    for job in candidates:
        if job.id in running:
            continue
        if blocked_by is not None:
            result.held[job.id] = f"behind job {blocked_by}, which waits for room in the budget"
            continue
        why = _held(job, now, cooling, holders, runners, per_runner)
        if why is not None:
            result.held[job.id] = why
            continue
        policy = Policy(**job.policy)
        host = governor.host_allows(policy)
        permit = None if host else governor.try_reserve(job.id, policy)
        if permit is None:
            # Strict head-of-line: nothing behind a job that does not fit may overtake it.
            reason = host or governor.why_not(policy)
            result.waiting = f"job {job.id} waits: {reason}"
            result.held[job.id] = reason
            blocked_by = job.id
            continue
        result.starts.append((job, permit))
        holders[job.workspace] = holders[("session", job.session_id)] = job.id
        per_runner[job.runner] = per_runner.get(job.runner, 0) + 1
    return result


def _held(job: Job, now: datetime, cooling: set[str], holders: dict, runners: Mapping[str, Runner],
          per_runner: dict[str, int]) -> str | None:
    """What other than the budget holds the job back, in words (these never block the jobs behind it)."""
    if job.status == Status.waiting_retry and job.retry_at and aware(job.retry_at) > now:
        return f"retries after a rate limit at {aware(job.retry_at):%H:%M:%S} UTC"
    if job.runner in cooling:  # a rate limit is account-wide: the runner rests until its cooldown ends
        return f"runner {job.runner} is cooling down after a rate limit"
    # A lower dir must not change under a mounted overlay: one job per workspace and per session.
    if holders.get(job.workspace, job.id) != job.id:
        return f"job {holders[job.workspace]} holds the workspace {job.workspace}"
    if holders.get(("session", job.session_id), job.id) != job.id:
        return f"job {holders[('session', job.session_id)]} of the same session {job.session_id} runs first"
    runner = runners.get(job.runner)
    if runner and runner.max_concurrent and per_runner.get(job.runner, 0) >= runner.max_concurrent:
        return f"runner {job.runner} already runs its max_concurrent = {runner.max_concurrent} jobs"
    return None
