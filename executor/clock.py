"""Time as the executor stores it: aware UTC datetimes.

Owns ``utcnow`` (the one source of "now" for stored times), ``aware`` (SQLite hands back naive
datetimes; every time the executor writes is UTC, so a naive one is read as UTC), epoch conversion, and
``span``, how a duration is written for people.

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


def span(seconds: float | None) -> str:
    """A duration for people, two units at most: ``45s``, ``3m07s``, ``2h05m``, ``1d04h``."""
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
