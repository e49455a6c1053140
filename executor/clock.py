"""Time as the executor stores it: aware UTC datetimes.

Owns ``utcnow`` (the one source of "now" for stored times) and ``aware`` (SQLite hands back naive
datetimes; every time the executor writes is UTC, so a naive one is read as UTC).

Must never: read local time zones, or sleep.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(moment: datetime) -> datetime:
    """``moment`` as an aware datetime; a naive one is taken as UTC (SQLite returns naive datetimes)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def from_epoch(value: Any) -> datetime | None:
    """An aware UTC datetime from epoch seconds (or milliseconds), or None if not a number."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if seconds > 1e12:  # milliseconds
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
