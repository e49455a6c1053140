"""Durable state: the status machine, the tables, and the ``Store`` that is the only way to them."""

from .models import ApiRequest, Attempt, Compaction, Event, Heartbeat, Job, RateLimitEvent, RunnerState
from .status import TERMINAL, TRANSITIONS, Status
from .store import Store

__all__ = ["ApiRequest", "Attempt", "Compaction", "Event", "Heartbeat", "Job", "RateLimitEvent", "RunnerState",
           "Status", "Store", "TERMINAL", "TRANSITIONS"]
