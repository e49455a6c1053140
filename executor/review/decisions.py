"""Review decisions: the queue of jobs waiting for a person, what each holds, approve / reject / request changes.

Owns the three decisions. A job in ``awaiting_review`` holds nothing but its upper dir (no overlay mounted,
no container): approving commits it through the one commit sequence (``transaction/commit.py``, the same
conflict check and apply as the pipeline); rejecting settles it rolled back, which removes the change;
requesting changes settles it rolled back *and* inserts, in the same transaction, a follow-up job of the
same session whose prompt is the reviewer's note and which continues the kept change (its upper dir moves
to the follow-up when that starts). Every decision moves the job from ``awaiting_review`` through the
store first, so two reviewers (the CLI and the web page, two processes) cannot both win. The diff the
reviewer saw is kept (``kept.py``) before the decision, so it can be shown after it. With several hosts
the kept change lies on the host that ran the job: it is shown, approved and sent back there (its CLI or
its web page; the follow-up runs there too); a rejection, which only discards, may come from any host.

Must never: apply anything while the repository conflicts with the change, apply other paths than the
ones approved, or touch the repository on reject.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from ..clock import aware, utcnow
from ..errors import (
    COMMITTED,
    ChangesRequested,
    Conflict,
    DiskImageError,
    IllegalTransition,
    InvalidJob,
    Rejected,
    ReviewError,
    WorkspaceChanged,
)
from ..intake.followup import revision
from ..settings import Settings
from ..store import Job, Status, Store
from ..transaction.commit import Ending, Phase, commit, settle
from ..transaction.upper import scan_upper
from ..transaction.workspace import Workspace, reattach
from . import kept
from .diff import FileDiff, changed_lines, diff_change

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """A job awaiting review and everything a reviewer needs about it."""

    job: Job
    reasons: list[dict]
    diffs: list[FileDiff]
    refused: list[str]
    missing: bool  # the kept change is gone (removed by hand): only reject makes sense

    @property
    def changed_lines(self) -> int:
        return changed_lines(self.diffs)


def _here(job: Job, settings: Settings) -> None:
    """The kept change must be on this host's disk."""
    if job.host_id is not None and job.host_id != settings.host_id:
        raise ReviewError(f"the change of job {job.id} is kept on host {job.host_id}, not on this host "
                          f"({settings.host_id}): review it there (`executor review` or the web page on that host)")


def _kept(settings: Settings, job: Job) -> Workspace:
    """The job's workspace, its disk image mounted (after a reboot the executor may not have done it yet)."""
    ws = Workspace.of(settings, job)
    try:
        reattach(ws)
    except (DiskImageError, OSError) as exc:
        raise ReviewError(f"the kept change of job {job.id} is on its disk image, which cannot be mounted here "
                          f"({exc}): decide as root on the host that ran it") from None
    return ws


def pending(store: Store, settings: Settings, job_id: str) -> Pending:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    _here(job, settings)
    ws = _kept(settings, job)
    if not ws.upper.is_dir():
        return Pending(job, job.review_reasons or [], [], [], True)
    change = scan_upper(ws.upper)
    try:
        with ws.trees() as (upper, repo):
            diffs = diff_change(change, upper, repo)
    except WorkspaceChanged as exc:
        raise ReviewError(f"{exc}; reject the job") from None
    return Pending(job, job.review_reasons or [], diffs, [f"{r.path} ({r.reason})" for r in change.refused], False)


def queue(store: Store) -> list[Job]:
    """Jobs awaiting review, the longest waiting first."""
    jobs = store.jobs([Status.awaiting_review])
    return sorted(jobs, key=lambda j: (aware(j.review_since or j.created_at), j.id))


# --------------------------------------------------------------------------------------------
# decisions


def _awaiting(store: Store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    if job.status != Status.awaiting_review:
        raise ReviewError(f"job {job_id} is {job.status.value}, not awaiting review"
                          + (f" ({job.reason})" if job.reason else ""))
    return job


def approve(store: Store, settings: Settings, job_id: str, files: Iterable[str] | None = None,
            note: str | None = None, *, by: str) -> Job:
    """Apply the job's tested change (or the part at ``files``) through the one commit sequence.

    Raises ``Conflict`` (the job fails, nothing applied, the change kept for inspection) when a path it
    would apply changed in the repository since the job started; ``ReviewError`` when it cannot be done.
    """
    job = _awaiting(store, job_id)
    _here(job, settings)
    ws = _kept(settings, job)
    if not ws.upper.is_dir():
        raise ReviewError(f"the kept change of job {job.id} is gone ({ws.upper}); reject the job")
    _keep_diff(store, settings, job)
    chosen = sorted({p.strip().strip("/") for p in files or [] if p.strip().strip("/")}) or None
    now = utcnow()
    phase = Phase(Status.awaiting_review)
    try:
        ending = commit(store, job, ws, phase, chosen, reviewed_by=by, reviewed_at=now, review_note=note)
    except (IllegalTransition, FileNotFoundError) as exc:  # a racing reject removes the change while it is read
        raise _decided_meanwhile(store, job, exc) from None
    outcome = "approved" if ending.reason == COMMITTED else ending.reason
    record = {"action": "approve", "by": by, "at": now.isoformat(), "note": note, "files": chosen,
              "outcome": outcome}
    if isinstance(ending.cause, Conflict):
        record["paths"] = ending.cause.paths
    store.add_event(job, job.attempts, "review", record)
    if phase.status == Status.awaiting_review:  # refused before committing: the decision is still recorded
        ending.fields.update(reviewed_by=by, reviewed_at=now, review_note=note)
    try:
        job = settle(store, job, ws, ending, phase)
    except IllegalTransition as exc:
        raise _decided_meanwhile(store, job, exc) from None
    log.info("review approve", extra={"action": "review", "job": job.id, "by": by, "outcome": outcome})
    if ending.cause is not None:
        raise ending.cause if isinstance(ending.cause, Conflict) else ReviewError(str(ending.cause))
    return job


def reject(store: Store, settings: Settings, job_id: str, note: str | None = None, *, by: str) -> Job:
    """Roll the job back: its kept change is removed, the repository is not touched."""
    job = _awaiting(store, job_id)
    _keep_diff(store, settings, job)
    now = utcnow()
    error = Rejected(f"rejected in review by {by}" + (f": {note}" if note else ""))
    ending = Ending.of(error, reviewed_by=by, reviewed_at=now, review_note=note)
    try:
        job = settle(store, job, Workspace.of(settings, job), ending, Phase(Status.awaiting_review))
    except IllegalTransition as exc:
        raise _decided_meanwhile(store, job, exc) from None
    store.add_event(job, job.attempts, "review", {"action": "reject", "by": by, "at": now.isoformat(),
                                                  "note": note, "outcome": "rejected"})
    log.info("review rejected", extra={"action": "review", "job": job.id, "by": by})
    return job


def request_changes(store: Store, settings: Settings, job_id: str, note: str, *, by: str,
                    runners: dict | None = None) -> tuple[Job, Job]:
    """End the job (rolled back, ``changes_requested``) and queue its follow-up in one transaction: the same
    session, the reviewer's note as prompt, the kept change as its starting point. Returns both jobs."""
    job = _awaiting(store, job_id)
    _here(job, settings)
    ws = _kept(settings, job)
    if not ws.upper.is_dir():
        raise ReviewError(f"the kept change of job {job.id} is gone ({ws.upper}); reject the job")
    try:
        follow = revision(job, note, settings, runners)
    except InvalidJob as exc:
        raise ReviewError(str(exc)) from None
    _keep_diff(store, settings, job)
    now = utcnow()
    note = note.strip()
    error = ChangesRequested(f"changes requested in review by {by}: {note} (job {follow.id} revises the change)")
    ending = Ending.of(error, reviewed_by=by, reviewed_at=now, review_note=note)
    ending.follow_up = follow
    try:
        job = settle(store, job, ws, ending, Phase(Status.awaiting_review))
    except IllegalTransition as exc:
        raise _decided_meanwhile(store, job, exc) from None
    store.add_event(job, job.attempts, "review", {"action": "request_changes", "by": by, "at": now.isoformat(),
                                                  "note": note, "outcome": "changes_requested",
                                                  "follow_up": follow.id})
    log.info("review changes requested", extra={"action": "review", "job": job.id, "by": by, "follow_up": follow.id})
    return job, store.get(follow.id) or follow


def _keep_diff(store: Store, settings: Settings, job: Job) -> None:
    """Keep what the reviewer is deciding on; a diff that cannot be made is no reason to refuse the decision."""
    try:
        kept.keep(settings, job.id, pending(store, settings, job.id).diffs)
    except (ReviewError, OSError) as exc:
        log.warning("review diff not kept", extra={"action": "review", "job": job.id, "error": str(exc)})


def _decided_meanwhile(store: Store, job: Job, exc: Exception) -> ReviewError:
    current = store.get(job.id)
    if current is not None and current.status == Status.awaiting_review:  # undecided: its change went by hand
        return ReviewError(f"the kept change of job {job.id} is gone ({exc}); reject the job")
    return ReviewError(f"job {job.id} was decided meanwhile: it is "
                       f"{current.status.value if current else 'gone'} ({exc})")


# --------------------------------------------------------------------------------------------
# numbers


def review_stats(jobs: Iterable[Job]) -> dict:
    """The review share (of the jobs whose tests passed, how many waited for a person) and the mean time
    a job waited for its decision."""
    passed = reviewed = waiting = 0
    waits: list[float] = []
    for job in jobs:
        if job.review_since is not None:
            reviewed += 1
            passed += 1
            if job.reviewed_at is not None:
                waits.append((aware(job.reviewed_at) - aware(job.review_since)).total_seconds())
            elif job.status == Status.awaiting_review:
                waiting += 1
        elif job.status == Status.succeeded:
            passed += 1
    return {
        "tests_passed": passed,
        "reviewed": reviewed,
        "awaiting_review": waiting,
        "review_share": round(reviewed / passed, 4) if passed else None,
        "decided": len(waits),
        "mean_review_wait_seconds": round(sum(waits) / len(waits), 1) if waits else None,
    }


def since(moment: datetime | None) -> float | None:
    """Seconds since ``moment`` (None if unknown)."""
    return (utcnow() - aware(moment)).total_seconds() if moment is not None else None
