"""The job status machine: every status a job can have and every legal move between them.

Owns ``Status``, which statuses are terminal, and ``TRANSITIONS``. The store applies a move only where the
job's current status is the expected one, so two actors racing (a watchdog and a cancel) cannot both win.

    queued -> running -> testing -> committing -> succeeded
                 |          |-> awaiting_review -> committing (approved) / rolled_back (rejected)
                 |          |-> rolled_back (tests failed) / failed / cancelled / queued (interrupted)
                 |-> waiting_retry (rate limited: slot freed, upper kept) -> running (same runner)
                 |                                       -> queued (its host was lost: from clean)
                 |-> rolled_back (agent error) / failed / stalled / cancelled / queued (interrupted)
    committing -> failed (the change could not be applied)
    (a job file refused at intake is recorded as rejected, and never moves)

Must never: let a terminal status change.
"""

from __future__ import annotations

from enum import Enum


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
    rejected = "rejected"  # the job file was refused at intake: it never ran (its error says why)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.stalled,
                      Status.rejected})

#: Every legal move. ``running``/``testing`` -> ``queued`` is the re-queue of a job whose attempt was
#: interrupted by the executor stopping or crashing (its changes were rolled back first).
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.queued: frozenset({Status.running, Status.cancelled, Status.failed}),
    Status.running: frozenset(
        {Status.testing, Status.rolled_back, Status.failed, Status.cancelled, Status.queued, Status.stalled,
         Status.waiting_retry}
    ),
    # A rate-limited job waits (slot freed, workspace kept) and then runs again against the same runner.
    # When its host is lost for good, another host holding the workspace root re-queues it from clean.
    Status.waiting_retry: frozenset({Status.running, Status.cancelled, Status.failed, Status.queued}),
    Status.testing: frozenset(
        {Status.committing, Status.rolled_back, Status.failed, Status.cancelled, Status.queued,
         Status.awaiting_review}
    ),
    # Review: approve commits (committing), reject rolls back, an approve that meets a conflict fails.
    Status.awaiting_review: frozenset({Status.committing, Status.rolled_back, Status.failed, Status.cancelled}),
    Status.committing: frozenset({Status.succeeded, Status.failed}),
}
