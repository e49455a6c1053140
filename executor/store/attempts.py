"""A job's attempts: their rows, and each attempt's own status, which follows its job's until it ends.

Owns starting an attempt, recording how its agent ended (``finish_attempt``), reading a job's attempts, and
``_follow_attempt``: in the transaction that moves a job, its current attempt takes the job's new status
while it lasts (``status.ATTEMPT_OPEN``) and, when the move ends it, how it ended and why (the job's
ending, ``waiting_retry`` or ``interrupted``). Whichever actor moves the job (its pipeline, a cancel, the
start-up recovery, a reviewer, a host taking over a lost one's work), the attempt tells the truth: one
whose job moved on is never shown running.

Must never: change an attempt that has ended, or change a job (mixed into ``Store``, which does).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import col

from ..clock import utcnow
from .models import Attempt, Job
from .status import ATTEMPT_OPEN, INTERRUPTED, Status, attempt_status


class AttemptQueries:
    """Mixed into ``Store``: the attempt rows."""

    session: Any
    redact: Any
    _rows: Any

    def start_attempt(self, job_id: str, number: int, host_id: str | None = None) -> Attempt:
        with self.session() as s:
            attempt = Attempt(job_id=job_id, number=number, host_id=host_id, status=Status.running.value)
            s.add(attempt)
            s.commit()
            s.refresh(attempt)
            return attempt

    def finish_attempt(self, attempt_id: int, **fields: Any) -> None:
        """Record how the attempt's agent ended (its outcome, exit code, usage); the attempt's own status
        moves with its job."""
        with self.session() as s:
            s.exec(  # type: ignore[call-overload]
                update(Attempt).where(col(Attempt.id) == attempt_id).values(finished_at=utcnow(), **self.redact(fields))
            )
            s.commit()

    def attempts(self, job_id: str) -> list[Attempt]:
        return self._rows(Attempt, Attempt.number, job_id=job_id)

    @staticmethod
    def _follow_attempt(s: Any, job_id: str, new: Status, reason: str | None) -> None:
        """In the transaction that moved the job to ``new``: its current attempt, if it has not ended, takes
        the status; one that ends here keeps why (``reason``) and when (unless its agent's end is known)."""
        status = attempt_status(new)
        values: dict[str, Any] = {"status": status}
        if status not in ATTEMPT_OPEN:
            values.update(reason=reason or (INTERRUPTED if new == Status.queued else None),
                          finished_at=func.coalesce(col(Attempt.finished_at), utcnow()))
        current = select(Job.attempts).where(col(Job.id) == job_id).scalar_subquery()
        statement = update(Attempt).where(col(Attempt.job_id) == job_id, col(Attempt.number) == current,
                                          col(Attempt.status).in_(ATTEMPT_OPEN)).values(**values)
        s.exec(statement)  # type: ignore[call-overload]
