"""Admission: which jobs this host starts now, claimed from the shared queue, and why its queue's head waits.

Owns the order of a claim round: the governor's lease first (all that is free, capped by the host's
available memory; nothing when the state root's disk is below its reserve), then the store's claim of the
head of this host's queue if it fits the lease (``store/queue.py``: one conditional statement, ``FOR
UPDATE SKIP LOCKED`` on PostgreSQL), then the lease narrowed to the claimed job's limits; again until
nothing more fits. Queued jobs are considered in priority, then arrival order, among those whose
workspace lies under one of this host's roots; a job waiting to retry here goes first. A workspace
lies on the storage of its root (``intake/storage.py``): a job is this host's only when the root at its
path here is that same storage, never merely the same path on this host's own disk. Admission is
strict head-of-line per host: when the head does not fit, nothing behind it starts here ahead of it, so a
big job is never starved by a stream of small ones. A job held back by its runner's cooldown (read from
the shared store: a 429 seen by one host cools the runner on all), its runner's ``max_concurrent`` on
this host, or a workspace or session another job holds (on any host) does not block the others.

``reasons`` puts in words why each job at the head of the queue has not started here (``status``, ``show``
and the page show them), by the same rules, from what the store and the governor say after a round.

Must never: start anything (it returns the claimed jobs with their permits), claim without a lease, or
read the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ..clock import aware, utcnow
from ..intake.storage import storage_of
from ..policy import Policy, Runner
from ..store import Job, Status, Store
from ..store.queue import HOLDING
from .governor import Governor, Permit


@dataclass
class Plan:
    """What to start now (each claimed, with its permit reserved) and why this host's queue's head waits."""

    starts: list[tuple[Job, Permit]] = field(default_factory=list)
    waiting: str | None = None


@dataclass(frozen=True)
class Host:
    """Who claims: the host's id and the workspace roots it holds, with the storage each root is
    (``intake/storage.py``; a root missing there serves only jobs whose storage was never recorded)."""

    id: str
    roots: tuple[str, ...]
    storage: Mapping[str, str] = field(default_factory=dict)

    @property
    def serving(self) -> dict[str, str | None]:
        """Its roots with their storage, as the store's claim takes them."""
        return {root: self.storage.get(root) for root in self.roots}


def claim(store: Store, governor: Governor, host: Host, runners: Mapping[str, Runner],
          per_runner: Mapping[str, int], busy: Sequence[str] = (),
          start: Callable[[Job, Permit], None] | None = None) -> Plan:
    """Claim the jobs this host starts now. ``per_runner``: this host's running jobs by runner (for
    ``max_concurrent``); ``busy``: jobs whose earlier thread still runs here (never claimed again meanwhile);
    ``start``: called with each job as soon as it is claimed (it need not wait for the rest of the round)."""
    result = Plan()
    counts = dict(per_runner)
    short = governor.disk_short()
    if short is not None:
        head = store.head(host.id, host.serving, _saturated(runners, counts))
        result.waiting = f"job {head.id} waits: {short}" if head is not None else None
        return result
    while True:
        saturated = _saturated(runners, counts)
        lease = governor.lease()
        job = None
        if lease is not None:
            try:
                job = store.claim(host.id, host.serving, lease.cpus, lease.memory, saturated=saturated,
                                  exclude=[*busy, *(j.id for j, _ in result.starts)])
            except BaseException:
                governor.release(lease)  # a claim the store refused (it is away) holds nothing
                raise
            if job is None:
                governor.release(lease)
        if job is None:
            result.waiting = _why_waiting(store, governor, host, saturated, busy)
            return result
        permit = governor.narrow(lease, job.id, Policy(**job.policy))
        result.starts.append((job, permit))
        if start is not None:
            start(job, permit)
        counts[job.runner] = counts.get(job.runner, 0) + 1


def _saturated(runners: Mapping[str, Runner], counts: Mapping[str, int]) -> list[str]:
    """Runners at their ``max_concurrent`` on this host."""
    return sorted(name for name, runner in runners.items()
                  if runner.max_concurrent and counts.get(name, 0) >= runner.max_concurrent)


def _why_waiting(store: Store, governor: Governor, host: Host, saturated: Sequence[str],
                 busy: Sequence[str]) -> str | None:
    """Why the head of this host's queue does not start (None when nothing waits here): the jobs the claim
    looked at, with its rules (a retry passed over for its runner or its running thread is not the head)."""
    head = store.due_retry(host.id, saturated, busy) or store.head(host.id, host.serving, saturated)
    if head is None:
        return None
    policy = Policy(**head.policy)
    why = governor.host_allows(policy) or governor.why_not(policy) or "another host is claiming it this instant"
    return f"job {head.id} waits: {why}"


def explain(store: Store, governor: Governor, host: Host, runners: Mapping[str, Runner],
            per_runner: Mapping[str, int], limit: int, paused: str | None = None,
            hosts: Sequence[Mapping] = ()) -> dict[str, str]:
    """``reasons`` for the first ``limit`` jobs of the queue, from what the store says now; ``paused``: why
    nothing starts at all now (the container engine is away), which is then every job's reason; ``hosts``:
    every host as ``executor status`` shows it (who holds which storage)."""
    queue = store.jobs([Status.queued, Status.waiting_retry], limit=limit)
    if paused is not None:
        return dict.fromkeys((job.id for job in queue), paused)
    if not queue:
        return {}
    now = utcnow()
    cooling = {name for name, st in store.runner_states().items() if st.cooldown_until and st.cooldown_until > now}
    bases = {job.builds_on for job in queue if job.builds_on}
    base_hosts = {base: (found.host_id if (found := store.get(base)) else None) for base in bases}
    return reasons(queue, store.jobs(HOLDING), host, governor, cooling, set(_saturated(runners, per_runner)),
                   base_hosts, now, hosts)


def reasons(queue: Sequence[Job], holding: Sequence[Job], host: Host, governor: Governor, cooling: set[str],
            saturated: set[str], base_hosts: Mapping[str, str | None], now: datetime,
            hosts: Sequence[Mapping] = ()) -> dict[str, str]:
    """Why each job of ``queue`` (the head of the shared queue and this host's waiting retries, in admission
    order) has not started here, by job id. ``holding``: the jobs that hold a workspace and a session (on any
    host); ``base_hosts``: for revisions, the host that keeps the change each continues; ``hosts``: every
    host's view (its state and its roots' storage)."""
    holders: dict = {}
    for job in holding:
        holders[job.workspace] = holders[("session", job.session_id)] = job.id
    held: dict[str, str] = {}
    blocked: str | None = None  # the head of this host's queue, which waits for room
    for job in queue:
        why = _elsewhere(job, host, base_hosts) or _other_storage(job, host, hosts)
        if why is None and blocked is not None:
            why = f"behind job {blocked}, which waits for room in the budget"
        if why is None:
            why = _held(job, holders, cooling, saturated, now)
        if why is None:
            policy = Policy(**job.policy)
            why = governor.host_allows(policy) or governor.why_not(policy)
            if why is not None:
                blocked = job.id
            else:
                why = "starts at the next claim round"
        held[job.id] = why
    return held


def _elsewhere(job: Job, host: Host, base_hosts: Mapping[str, str | None]) -> str | None:
    """Why the job is another host's to run, if it is."""
    if job.status == Status.waiting_retry and job.host_id not in (None, host.id):
        return f"it waits to retry on host {job.host_id}"
    if not any(job.workspace == root or job.workspace.startswith(root.rstrip("/") + "/") for root in host.roots):
        return "its workspace is under none of this host's roots: a host that holds it runs it"
    kept = base_hosts.get(job.builds_on) if job.builds_on else None
    if kept not in (None, host.id):
        return f"the change it revises is kept on host {kept}, which runs it"
    return None


def _other_storage(job: Job, host: Host, hosts: Sequence[Mapping]) -> str | None:
    """Why a job whose workspace lies on storage this host does not see is not this host's (the same path
    here is another directory), and which hosts hold that storage; None when this host holds it."""
    storage = job.storage
    if storage is None or storage_of(host.storage, job.workspace) == storage:
        return None
    holders = [h for h in hosts if storage in (h.get("storage") or {}).values() and h["host"] != host.id]
    alive = [h["host"] for h in holders if h["state"] == "alive"]
    here = f"its workspace {job.workspace} lies on storage this host does not share (the same path here is " \
           "another directory)"
    if alive:
        return f"{here}: host {' or '.join(alive)} runs it"
    if holders:
        gone = ", ".join(f"{h['host']} ({h['state']})" for h in holders)
        return f"{here}, and no host that holds it is running ({gone}): it waits for one of them"
    return f"{here}, and no host holds it now: it waits for a host whose root is that storage ({storage})"


def _held(job: Job, holders: dict, cooling: set[str], saturated: set[str], now: datetime) -> str | None:
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
    if job.runner in saturated:
        return f"runner {job.runner} already runs its max_concurrent jobs on this host"
    return None
