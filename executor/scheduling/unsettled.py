"""The jobs this host holds but could not settle, until it has.

Owns the serving loop's list of its own jobs whose thread ended without recording how: the container
engine or the store went away during the attempt (``EngineUnavailable``, ``StoreUnavailable``: what the
attempt saw is not to be trusted), or while its known ending was being recorded (``Unsettled``). Each keeps
its slot and its permit (a container an engine kept running still uses its share of the budget) and is
tried again by the loop with backoff (2 s doubling to 60 s; at once when the engine comes back) until it
is settled: an attempt whose end is unknown is resolved as start-up recovery resolves it (its container
adopted if it still runs, its tests run again, its commit finished, else rolled back and re-queued); a known
ending is recorded again. Until then ``status`` shows it as a problem. A job in the store as running thus
always has a live thread here, an entry here, or a host whose lease has lapsed.

Must never: let go of a job that is still this host's attempt, move a job another actor moved meanwhile
(every move is fenced by host and attempt), or hold up the serving loop: a try that fails waits its turn.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..clock import utcnow
from ..errors import EngineUnavailable, IllegalTransition, StoreUnavailable, Unsettled
from ..policy import Policy
from ..store import Status
from ..transaction.commit import Ending, Phase, settle
from ..transaction.workspace import Workspace
from .recovery import ACTIVE, Executor, recover_job

log = logging.getLogger(__name__)

FIRST_DELAY, MAX_DELAY = 2.0, 60.0


@dataclass
class Held:
    """One job held: the attempt, why, since when, and (when known) the ending still to record."""

    job_id: str
    attempt: int
    why: str
    cause: str  # what cut the attempt short, for the job's error if it is re-queued
    since: str = field(default_factory=lambda: utcnow().isoformat())
    ending: Ending | None = None
    status: Status | None = None  # the phase the known ending was reached in
    tries: int = 0
    next_at: float = 0.0  # monotonic

    def view(self) -> dict:
        return {"job": self.job_id, "attempt": self.attempt, "why": self.why, "since": self.since,
                "tries": self.tries, "ending": self.ending.status.value if self.ending else None,
                "retry_in": max(0.0, round(self.next_at - time.monotonic(), 1))}


class UnsettledJobs:
    """Thread-safe: job threads hand their jobs in, the serving loop tries them again."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, job_id: str, attempt: int, error: BaseException) -> None:
        """Keep ``job_id`` (its thread is ending) until the loop settles it."""
        cause = ("the container engine was unreachable" if isinstance(error, EngineUnavailable)
                 else "the store was unavailable" if isinstance(error, StoreUnavailable)
                 else "the engine or the store failed")
        held = Held(job_id, attempt, f"{type(error).__name__}: {error}"[:500], cause,
                    next_at=time.monotonic() + FIRST_DELAY)
        if isinstance(error, Unsettled):
            held.ending, held.status = error.ending, error.status  # type: ignore[assignment]
        with self._lock:
            self._held[job_id] = held
        log.warning("job held: it could not be settled now and is tried again", extra={
            "action": "job_held", "job": job_id, "attempt": attempt, "error": held.why})

    def wake(self) -> None:
        """Try every held job at the next round (the engine answers again)."""
        with self._lock:
            for held in self._held.values():
                held.next_at = 0.0

    def view(self) -> list[dict]:
        with self._lock:
            return [held.view() for held in self._held.values()]

    def problems(self) -> list[str]:
        return [f"job {v['job']} could not be settled since {v['since'][11:19]} UTC ({v['why'][:200]}); "
                f"tried {v['tries']} times, next in {v['retry_in']:g}s" for v in self.view()]

    def retry(self, ex: Executor) -> None:
        """Try the held jobs that are due, in the order they were held."""
        now = time.monotonic()
        with self._lock:
            due = [held for held in self._held.values() if held.next_at <= now]
        for held in due:
            with self._lock:  # out of the list while it is tried: a thread it starts may hand it in again
                if self._held.get(held.job_id) is not held:
                    continue
                del self._held[held.job_id]
            try:
                _resolve(ex, held)
            except IllegalTransition as exc:  # another actor moved it first: no longer this host's to settle
                log.warning("held job moved by another actor", extra={"job": held.job_id, "error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - the engine or the store is still away: try later
                held.tries += 1
                held.why = f"{type(exc).__name__}: {exc}"[:500]
                held.next_at = time.monotonic() + min(MAX_DELAY, FIRST_DELAY * 2 ** held.tries)
                with self._lock:
                    self._held.setdefault(held.job_id, held)

    def release_all(self) -> list[str]:
        """Let go of every held job at shutdown: its row stays as it is, for start-up recovery."""
        with self._lock:
            ids, self._held = list(self._held), {}
        return ids


def _resolve(ex: Executor, held: Held) -> None:
    """Settle one held job: record its known ending, or resolve it as recovery does. Its slot is given up
    first (recovery reserves the job's permit anew) and taken back if the try fails."""
    job = ex.store.get(held.job_id)
    if job is None or job.status not in ACTIVE or job.host_id != ex.settings.host_id or job.attempts != held.attempt:
        _drop_slot(ex, held.job_id)
        return  # no longer this attempt's (cancelled, taken over, settled): nothing of it is ours to move
    slot = _drop_slot(ex, held.job_id)
    try:
        if held.ending is not None and held.status is not None:
            settle(ex.store, job, Workspace.of(ex.settings, job), held.ending,
                   Phase(held.status, owner=(ex.settings.host_id, held.attempt)), ex.sandbox, ex.ctx.settled)
        else:
            recover_job(ex, job, cause=held.cause)
    except BaseException:
        if slot is not None and held.job_id not in ex.slots:  # no thread took it: hold its place again
            permit = ex.governor.try_reserve(held.job_id, Policy(**job.policy)) or slot.permit
            ex.slots[held.job_id] = type(slot)(job, permit, slot.thread, slot.done)
        raise
    log.info("held job settled", extra={"action": "job_unheld", "job": held.job_id, "tries": held.tries})


def _drop_slot(ex: Executor, job_id: str):
    ex.ctx.stop_requests.pop(job_id, None)  # asked of the attempt that ended: never of the job's next one
    slot = ex.slots.pop(job_id, None)
    if slot is not None:
        ex.governor.release(slot.permit)
    return slot
