"""The one commit sequence, and how an attempt settles: used by the pipeline and by a review approval alike.

Owns the order of a commit: read the upper dir (``scan_upper``), refuse what must never be applied, check
the repository against the moment the job started (``check_conflicts``; not for ``land = "branch"``, which
never touches the working tree), move the job to ``committing`` (the journal: the status plus the kept
upper dir), build the change's commit when the policy lands it in git (``landing.py``), journal the plan,
apply the files (not for ``branch``), move the ref, and settle. ``finish`` redoes all of it after a crash
(each step is idempotent). ``settle`` cleans up the attempt's containers and overlay, then records the
ending, guarded by the phase the caller knows the job is in, so a racing cancel or watchdog loses
cleanly instead of being overwritten.

Must never: apply a change whose upper dir holds something unsafe, apply while the repository conflicts
with the change, apply other paths than the ones chosen, or record an ending before cleaning up.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import (
    COMMITTED,
    CommitFailed,
    Conflict,
    ExecutorError,
    GitError,
    IllegalTransition,
    UnsafePath,
    WorkspaceChanged,
)
from ..agent.registry import session_carry
from ..logs import log_state
from ..policy import Policy
from ..sandbox.deployment import Deployment
from ..store import Job, Status, Store
from . import home, landing, workspace
from .apply import apply_change, planned
from .conflicts import check_conflicts
from .git import Git
from .journal import load, save
from .upper import Change, refuse_storage_marker, scan_upper, select
from .workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class Ending:
    """Where an attempt ended: the status to move to and why."""

    status: Status
    reason: str
    error: str | None = None
    keep_upper: bool = False
    fields: dict = field(default_factory=dict)  # more job fields to set with the status
    cause: ExecutorError | None = None  # the error it ended with, if any
    follow_up: Job | None = None  # a job inserted with the ending, in one transaction (a reviewer's revision)

    @classmethod
    def of(cls, error: ExecutorError, **fields: object) -> Ending:
        """The ending of an attempt that ended with ``error`` (its reason, status and message)."""
        return cls(Status(error.ends_as), error.reason, str(error), keep_upper=error.keeps_change, fields=fields,
                   cause=error)


@dataclass
class Phase:
    """The status an attempt's owner knows the job is in. Every move the owner makes goes through it, so
    the store refuses the move (``IllegalTransition``) when someone else moved the job meanwhile. ``owner``
    (host, attempt) fences a host's attempt: once another host took the job over, the old attempt can move
    it nowhere (above all not to ``committing``)."""

    status: Status
    owner: tuple[str, int] | None = None

    def move(self, store: Store, job: Job, new: Status, add: Job | None = None, **fields: object) -> Job:
        moved = store.transition(job.id, self.status, new, owner=self.owner, add=add, **fields)
        self.status = new
        return moved


def commit(store: Store, job: Job, ws: Workspace, phase: Phase, files: Iterable[str] | None = None,
           **fields: object) -> Ending:
    """Commit the job's tested change (or the part at ``files``): the job moves from its phase (testing,
    or awaiting_review for an approval) to ``committing``, then the change is applied.

    Returns the ending to settle with (``failed`` for an unsafe change, a conflict or a workspace that is no
    longer the one the job started on: nothing applied). ``fields`` are set on the job with the move to
    ``committing`` (a review's decision).
    """
    chosen = sorted({p.strip().strip("/") for p in files or [] if p.strip().strip("/")}) or None
    change = select(scan_upper(ws.upper), chosen)
    if ws.repo in {Path(root) for root in ws.roots}:
        refuse_storage_marker(change)
    if change.refused:
        return Ending.of(UnsafePath("the change holds entries that are never applied: " +
                                    ", ".join(f"{r.path} ({r.reason})" for r in change.refused)))
    try:
        repo_fd = ws.open_repo()
    except WorkspaceChanged as exc:
        return Ending.of(exc)
    try:
        conflicts = _conflicts(job, change, repo_fd)
        if conflicts:
            return Ending.of(Conflict(conflicts))
        job = phase.move(store, job, Status.committing, changed_files=change.changed_files, review_files=chosen,
                         **fields)
        store.add_event(job, ws.attempt, "state", {"status": "committing", "changed_files": change.changed_files,
                                                  "ignored_git": change.ignored_git})
        log_state(job, Status.committing, ws.attempt, changed=len(change.changed_files))
        return _apply(store, job, ws, change, repo_fd)
    finally:
        os.close(repo_fd)


def has_conflicts(ws: Workspace, change: Change, since_ns: int) -> bool:
    """Whether ``commit`` would refuse ``change`` for a conflict (or a changed workspace) right now."""
    try:
        repo_fd = ws.open_repo()
    except WorkspaceChanged:
        return True
    try:
        return bool(check_conflicts(change, repo_fd, since_ns))
    finally:
        os.close(repo_fd)


def _conflicts(job: Job, change: Change, repo_fd: int) -> list[str]:
    """The paths the repository changed under the job: none matter to a branch, which leaves it as it is."""
    if Policy(**job.policy).land == "branch":
        return []
    return check_conflicts(change, repo_fd, job.start_ns or 0)


def finish(store: Store, job: Job, ws: Workspace) -> Ending:
    """Apply the kept upper dir again after a crash: the journal says what was planned and done."""
    # With a journal its plan is what is carried out: the upper dir may already have lost moved files, so a
    # partial approval's paths could not be selected from it again. Without one, nothing was applied yet.
    change = Change() if ws.journal.exists() else select(scan_upper(ws.upper), job.review_files)
    try:
        repo_fd = ws.open_repo()
    except WorkspaceChanged as exc:
        return Ending.of(exc)
    try:
        return _apply(store, job, ws, change, repo_fd)
    finally:
        os.close(repo_fd)


def _apply(store: Store, job: Job, ws: Workspace, change: Change, repo_fd: int) -> Ending:
    try:
        plan = load(ws.journal)
        if plan is None:  # the plan, and the commit a landing in git puts on its ref, before anything moves
            plan = planned(change)
            landed = landing.prepare(job, ws, change, repo_fd)
            if landed is not None:
                plan.git = asdict(landed)
                if landed.mode == "branch":
                    plan.entries = []  # the working tree is not touched
            save(ws.journal, plan)
        apply_change(change, ws.upper, repo_fd, ws.uid, ws.gid, journal=ws.journal)
    except GitError as exc:
        return Ending.of(exc)
    except (UnsafePath, OSError) as exc:
        return Ending.of(CommitFailed(f"the change could not be applied: {exc}"))
    fields = {}
    plan = load(ws.journal)  # as the apply left it (its phases done)
    if plan is not None and plan.git is not None:
        try:
            done = landing.finish(Git(repo_fd, ws.uid, ws.gid), landing.Landing(**plan.git), ws.journal, plan)
        except (GitError, OSError) as exc:
            applied = "" if plan.git["mode"] == "branch" else "the change is in the working tree, but "
            return Ending.of(GitError(f"{applied}its commit could not be landed: {exc}"))
        fields["git"] = done.record(job.git)
        store.add_event(job, ws.attempt, "git", fields["git"])
    _carry_home(store, job, ws)
    return Ending(Status.succeeded, COMMITTED, fields=fields)


def _carry_home(store: Store, job: Job, ws: Workspace) -> None:
    """The committed job hands on what its policy allows of its home layer to the next job of its session."""
    if ws.home is None:
        return
    patterns = session_carry(job)  # the policy's, else the job's agent's transcripts
    try:
        carried = home.carry(ws.home_upper, ws.home, patterns, ws.uid, ws.gid)
    except (ExecutorError, OSError) as exc:  # the repository is committed; the home is only the next job's help
        store.add_event(job, ws.attempt, "session_home", {"carried": [], "error": str(exc)})
        log.warning("session home not carried", extra={"action": "session_home", "job": job.id, "error": str(exc)})
        return
    store.add_event(job, ws.attempt, "session_home", {"carried": carried[:200], "count": len(carried)})


#: Called with a job that just settled (a notification, for example); must never raise.
SettleHook = Callable[[Job], None]


def settle(store: Store, job: Job, ws: Workspace, ending: Ending, phase: Phase,
           deployment: Deployment | None = None, on_settled: SettleHook | None = None) -> Job:
    """Clean up the attempt's containers and overlay, then record the ending (in that order: a crash in
    between leaves a job the restart recovery resolves). ``phase``: the status the caller knows the job
    is in; when someone else moved the job meanwhile, ``IllegalTransition`` is raised and logged."""
    # A running attempt is owned by its thread: clean up first, so the status never claims a state the
    # disk does not have yet. A job awaiting review is owned by no one (two reviewers may race): claim it
    # first, so the loser never removes the winner's change.
    owned = phase.status != Status.awaiting_review
    if owned:
        _clean_up(deployment, ws, ending)
    fields = {} if ending.status == Status.queued else {"reason": ending.reason, "error": ending.error}
    fields.update(ending.fields)
    try:
        settled = phase.move(store, job, ending.status, add=ending.follow_up, **fields)
    except IllegalTransition as exc:
        log.error("cannot settle job", extra={"action": "settle_refused", "job": job.id, "error": str(exc)})
        raise
    if not owned:
        _clean_up(deployment, ws, ending)
    store.add_event(settled, ws.attempt, "state", {"status": ending.status.value, "reason": ending.reason,
                                                    "error": ending.error})
    log_state(settled, ending.status, ws.attempt, reason=ending.reason, error=ending.error)
    if on_settled is not None:
        on_settled(settled)
    return settled


def _clean_up(deployment: Deployment | None, ws: Workspace, ending: Ending) -> None:
    if ending.keep_upper:
        workspace.release(deployment, ws)
    else:
        workspace.discard(deployment, ws)
