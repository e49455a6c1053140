"""What the sealed sandbox's gateways and egress proxies report, in the store: API request rows, and the
batches of rows and events a job's journal hands over (``sandbox/journal.py``), each in one transaction.

Owns the ``api_requests`` table's queries and ``add_sandbox_batch``. Mixed into ``Store``.

Must never: store a secret (every free-text value goes through ``redact``), or write a batch in more than
one transaction.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from .models import ApiRequest, Event, Job


class SealedQueries:
    """Mixed into ``Store``: rows and events of sealed jobs' sockets."""

    redact: Any
    session: Any
    _rows: Any

    def add_api_request(self, row: ApiRequest) -> None:
        row.error = self.redact(row.error)
        with self.session() as s:
            s.add(row)
            s.commit()

    def api_requests(self, job_id: str | None = None, runner: str | None = None) -> list[ApiRequest]:
        return self._rows(ApiRequest, ApiRequest.id, job_id=job_id, runner=runner)

    def add_sandbox_batch(self, job: Job, attempt: int, requests: list[ApiRequest], new: list[tuple[str, dict]],
                          updates: list[tuple[int, dict]]) -> list[int]:
        """What a sealed job's sockets reported, in one transaction: API request rows, new events, and new data
        for events written before (an aggregate's count). Returns the new events' ids, in order."""
        with self.session() as s:
            for row in requests:
                row.error = self.redact(row.error)
                s.add(row)
            events = [Event(job_id=job.id, session_id=job.session_id, attempt=attempt, kind=kind,
                            data=self.redact(json.loads(json.dumps(data, default=str)))) for kind, data in new]
            s.add_all(events)
            for event_id, data in updates:
                s.exec(update(Event).where(col(Event.id) == event_id)  # type: ignore[call-overload]
                       .values(data=self.redact(json.loads(json.dumps(data, default=str)))))
            s.flush()
            ids = [event.id for event in events]
            s.commit()
            return ids
