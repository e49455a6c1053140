"""What one job's gateway and egress proxy reported and the store does not have yet, with a bound that does not
grow with what the job does.

Owns ``JobJournal``: API requests queue one by one (each is a row of its own: usage is accounting); identical
refusals and identical egress decisions are one aggregate each, an event written once and then updated with
its count ("refused 19,750 requests like this one"), never a row per request; at most ``cap`` aggregates
per job, and past the cap only counts, in one more event that says the cap was reached and how much it left
unrecorded. ``take`` hands out a ``Batch`` (the queued requests, up to a number, and every aggregate whose
count moved), ``written`` tells the journal which event ids the store gave the new ones.

Thread-safe: the event loop adds (O(1) under a lock, never blocking on the store), the recorder thread or the
job's closing thread takes. Must never: keep more than ``cap`` + 1 aggregates, or lose a count (a count
that moves while its batch is written goes with the next one; a batch the store refused goes with the
aggregate's next change).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REFUSED, EGRESS, CAPPED = "gateway_refused", "egress", "sealed_events_capped"


@dataclass
class Aggregate:
    """Identical reports: the first one, how many, and (egress) the bytes and time of all of them."""

    kind: str
    first: Any  # the first Refusal or EgressEvent; None for the cap's own aggregate
    count: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration: float = 0.0
    event_id: int | None = None  # the store's id once written
    unrecorded: dict[str, int] = field(default_factory=dict)  # the cap's: reports past it, by kind


@dataclass(frozen=True)
class Entry:
    """An aggregate as it is to be written: a new event (``event_id`` None) or an update of its count."""

    aggregate: Aggregate
    kind: str
    first: Any
    count: int
    bytes_up: int
    bytes_down: int
    duration: float
    event_id: int | None
    unrecorded: dict[str, int]


@dataclass
class Batch:
    """What one transaction writes for one job."""

    job_id: str
    requests: list[Any]  # RequestRecord, in the order they ended
    entries: list[Entry]

    def new(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.event_id is None]


class JobJournal:
    """One job's reports waiting for the store. ``on_ready`` is called (on the reporting thread, so it must be
    quick) when the journal had nothing to write and now has."""

    def __init__(self, job_id: str, cap: int, on_ready: Callable[[], None] = lambda: None) -> None:
        self.job_id = job_id
        self.cap = cap
        self.on_ready = on_ready
        self.counts: dict[str, int] = {REFUSED: 0, EGRESS: 0}  # every report, recorded or not
        self._requests: deque[Any] = deque()
        self._aggregates: dict[tuple, Aggregate] = {}
        self._dirty: dict[int, Aggregate] = {}  # by id(): aggregates whose count moved since last written
        self._capped: Aggregate | None = None
        self._lock = threading.Lock()

    # -- reports (the event loop's thread) -----------------------------------------------------------------

    def request(self, record: Any) -> None:
        with self._lock:
            was_idle = self._idle()
            self._requests.append(record)
        if was_idle:
            self.on_ready()

    def refusal(self, refusal: Any) -> None:
        key = (REFUSED, refusal.kind, refusal.method, refusal.path, refusal.status, refusal.reason,
               refusal.requested_model)
        self._add(key, REFUSED, refusal)

    def egress(self, event: Any) -> None:
        key = (EGRESS, event.allowed, event.method, event.host, event.port, event.status, event.reason)
        self._add(key, EGRESS, event, event.bytes_up, event.bytes_down, event.duration)

    def _add(self, key: tuple, kind: str, report: Any, up: int = 0, down: int = 0, duration: float = 0.0) -> None:
        with self._lock:
            was_idle = self._idle()
            self.counts[kind] += 1
            aggregate = self._aggregates.get(key)
            if aggregate is None and len(self._aggregates) < self.cap:
                aggregate = self._aggregates[key] = Aggregate(kind, report)
            if aggregate is None:  # past the cap: only counted
                aggregate = self._capped = self._capped or Aggregate(CAPPED, None)
                aggregate.unrecorded[kind] = aggregate.unrecorded.get(kind, 0) + 1
            aggregate.count += 1
            aggregate.bytes_up += up
            aggregate.bytes_down += down
            aggregate.duration += duration
            self._dirty[id(aggregate)] = aggregate
        if was_idle:
            self.on_ready()

    def _idle(self) -> bool:
        return not self._requests and not self._dirty

    # -- writing (the recorder's thread, or the job's closing thread) ---------------------------------------

    def pending(self) -> int:
        """How many requests and aggregates wait to be written."""
        with self._lock:
            return len(self._requests) + len(self._dirty)

    def take(self, requests: int = 500) -> Batch | None:
        """The next batch: up to ``requests`` requests and every aggregate whose count moved; None if nothing."""
        with self._lock:
            if self._idle():
                return None
            taken = [self._requests.popleft() for _ in range(min(requests, len(self._requests)))]
            entries = [Entry(a, a.kind, a.first, a.count, a.bytes_up, a.bytes_down, a.duration, a.event_id,
                             dict(a.unrecorded)) for a in self._dirty.values()]
            self._dirty.clear()
            return Batch(self.job_id, taken, entries)

    def written(self, batch: Batch, ids: list[int]) -> None:
        """The store wrote ``batch``; ``ids``: the events it made for ``batch.new()``, in order."""
        with self._lock:
            for entry, event_id in zip(batch.new(), ids):
                entry.aggregate.event_id = event_id
