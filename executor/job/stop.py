"""Why a running attempt must stop now: the executor is shutting down, the serving loop asked for it (the
state root's disk ran low), the job's API gateway refused a model other than the runner's, a person asked
to cancel it, or the job is no longer this host's attempt (this host was found lost and another host took
the job over).

Owns the cheap check the runtime calls between stream lines: the shutdown flag, the loop's requests and the
gateway's refusal flag every time, the store's row at most once a second (a cancel is a person's action; a
second is quick enough).

Must never: stop anything itself; it only answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .context import Context


class StopCheck:
    def __init__(self, ctx: Context, job_id: str, attempt: int | None = None,
                 refused: Callable[[], bool] | None = None) -> None:
        self.ctx, self.job_id, self.attempt, self.refused = ctx, job_id, attempt, refused
        self._next_poll = 0.0
        self._cancelled = False
        self._taken = False

    def __call__(self) -> str | None:
        if self.ctx.shutdown.is_set():
            return "shutdown"
        if (why := self.ctx.stop_requests.get(self.job_id)) is not None:
            return why
        if self.refused is not None and self.refused():
            return "model_mismatch"
        now = time.monotonic()
        if not (self._cancelled or self._taken) and now >= self._next_poll:
            self._next_poll = now + 1.0
            job = self.ctx.store.get(self.job_id)
            self._cancelled = bool(job and job.cancel_requested)
            self._taken = self.attempt is not None and (
                job is None or job.host_id != self.ctx.settings.host_id or job.attempts != self.attempt)
        return "taken_over" if self._taken else "cancelled" if self._cancelled else None
