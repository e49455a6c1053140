"""Admission: which jobs this host starts now, claimed from the shared queue, and why its queue's head waits.

Owns the order of a claim round: the governor's lease first (all that is free, capped by the host's
available memory; nothing when the state root's disk is below its reserve), then the store's claim of the
head of this host's queue if it fits the lease (``store/queue.py``: one conditional statement, ``FOR
UPDATE SKIP LOCKED`` on PostgreSQL), then the lease narrowed to the claimed job's limits; again until
nothing more fits. Queued jobs are considered in priority, then arrival order, among those whose
workspace lies under one of this host's roots; a job waiting to retry here goes first. Admission is
strict head-of-line per host: when the head does not fit, nothing behind it starts here ahead of it, so a
big job is never starved by a stream of small ones. A job held back by its runner's cooldown (read from
the shared store: a 429 seen by one host cools the runner on all), its runner's ``max_concurrent`` on
this host, or a workspace or session another job holds (on any host) does not block the others.

Must never: start anything (it returns the claimed jobs with their permits), claim without a lease, or
read the environment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..policy import Policy, Runner
from ..store import Job, Store
from .governor import Governor, Permit


@dataclass
class Plan:
    """What to start now (each claimed, with its permit reserved) and why this host's queue's head waits."""

    starts: list[tuple[Job, Permit]] = field(default_factory=list)
    waiting: str | None = None


@dataclass(frozen=True)
class Host:
    """Who claims: the host's id and the workspace roots it holds."""

    id: str
    roots: tuple[str, ...]


def claim(store: Store, governor: Governor, host: Host, runners: Mapping[str, Runner],
          per_runner: Mapping[str, int], busy: Sequence[str] = ()) -> Plan:
    """Claim the jobs this host starts now. ``per_runner``: this host's running jobs by runner (for
    ``max_concurrent``); ``busy``: jobs whose earlier thread still runs here (never claimed again meanwhile)."""
    result = Plan()
    counts = dict(per_runner)
    short = governor.disk_short()
    if short is not None:
        head = store.head(host.id, host.roots, _saturated(runners, counts))
        result.waiting = f"job {head.id} waits: {short}" if head is not None else None
        return result
    while True:
        saturated = _saturated(runners, counts)
        lease = governor.lease()
        job = None
        if lease is not None:
            job = store.claim(host.id, host.roots, lease.cpus, lease.memory, saturated=saturated,
                              exclude=[*busy, *(j.id for j, _ in result.starts)])
            if job is None:
                governor.release(lease)
        if job is None:
            result.waiting = _why_waiting(store, governor, host, saturated)
            return result
        permit = governor.narrow(lease, job.id, Policy(**job.policy))
        result.starts.append((job, permit))
        counts[job.runner] = counts.get(job.runner, 0) + 1


def _saturated(runners: Mapping[str, Runner], counts: Mapping[str, int]) -> list[str]:
    """Runners at their ``max_concurrent`` on this host."""
    return sorted(name for name, runner in runners.items()
                  if runner.max_concurrent and counts.get(name, 0) >= runner.max_concurrent)


def _why_waiting(store: Store, governor: Governor, host: Host, saturated: Sequence[str]) -> str | None:
    """Why the head of this host's queue does not start (None when nothing waits here)."""
    head = store.due_retry(host.id) or store.head(host.id, host.roots, saturated)
    if head is None:
        return None
    policy = Policy(**head.policy)
    why = governor.host_allows(policy) or governor.why_not(policy) or "another host is claiming it this instant"
    return f"job {head.id} waits: {why}"
