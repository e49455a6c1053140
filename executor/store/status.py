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

An attempt has a status of its own, which follows its job's while the attempt lasts (running, testing,
committing, awaiting_review: ``ATTEMPT_OPEN``) and then says how it ended: the job's ending (succeeded,
rolled_back, failed, stalled, cancelled), ``waiting_retry`` (a rate limit: the next attempt resumes) or
``interrupted`` (the job went back to the queue). An ended attempt never changes again.

Must never: let a terminal status change, or an ended attempt's.
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

#: The statuses of an attempt that has not ended; every other status of an attempt is how it ended.
ATTEMPT_OPEN = frozenset({Status.running.value, Status.testing.value, Status.committing.value,
                          Status.awaiting_review.value})
#: How an attempt ended when its job went back to the queue (the executor stopped, its host was lost).
INTERRUPTED = "interrupted"


def attempt_status(job_status: Status) -> str:
    """The status of a job's current attempt when the job moves to ``job_status``."""
    return INTERRUPTED if job_status == Status.queued else job_status.value


def attempt_text(status: str | None, reason: str | None) -> str:
    """An attempt's status as a person reads it: the phase it is in, or how it ended and why
    (``failed (sandbox)``)."""
    status = status or "unknown"  # read from a database not yet migrated to attempt statuses
    return status + (f" ({reason})" if reason and reason != status else "")
