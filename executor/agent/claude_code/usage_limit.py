"""Plan usage-limit messages ("You've hit your limit · resets 3am (Europe/Lisbon)") and their reset time.

Owns recognising such a message in the CLI's text and reading the moment it names, in the zone it names.

Must never: read the clock other than through the ``now`` it is given.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ...clock import aware, from_epoch

# --------------------------------------------------------------------------------------------------
# 5. Usage-limit messages

# "Claude AI usage limit reached|1767225600" (older CLIs: epoch seconds after a pipe)
_EPOCH_LIMIT_RE = re.compile(r"usage limit reached\s*\|\s*(\d{9,14})", re.I)
# "You've hit your [session|weekly|Opus|...] limit · resets <when>", "5-hour limit reached ∙ resets
# 3am", "usage limit reached. Your limit will reset at 1pm (Europe/Lisbon)"
_LIMIT_PHRASE_RE = re.compile(
    r"(?:you(?:'|’|\u2019)?ve|you have) hit your\b[^.\n]{0,40}?\blimit"
    r"|\b(?:usage|session|weekly|opus|sonnet|\d+-hour) limit (?:reached|exceeded)"
    r"|\bout of extra usage\b",
    re.I,
)
_RESET_RE = re.compile(r"\bresets?\b(?:\s+(?:at|on))?\s*(?P<when>.+)", re.I | re.S)
_ZONE_RE = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9_+\-/]*)\s*\)")
_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
_MONTH = r"(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_MONTH_DAY_RE = re.compile(rf"\b{_MONTH}\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\b", re.I)
_DAY_MONTH_RE = re.compile(rf"\b(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+{_MONTH}", re.I)
_YEAR_RE = re.compile(r"\b(20\d\d)\b")
_WEEKDAY_RE = re.compile(r"\b(mon|tue|wed|thu|fri|sat|sun)[a-z]*\b\.?", re.I)
_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_AMPM_RE = re.compile(r"\b(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s*(?P<ap>[ap])\.?\s*m\b\.?", re.I)
_24H_RE = re.compile(r"\b(?P<h>\d{1,2}):(?P<m>\d{2})\b")


def looks_like_usage_limit(text: str) -> bool:
    """True when ``text`` is one of the plan's usage-limit messages (any wording seen so far)."""
    return bool(text) and bool(_EPOCH_LIMIT_RE.search(text) or _LIMIT_PHRASE_RE.search(text))


def parse_usage_limit(text: str, now: datetime) -> datetime | None:
    """The reset time of a plan usage-limit message, as an aware datetime; None if not one.

    Times without a date mean their next occurrence after ``now`` in the message's zone (UTC when
    the message names none). Also None when it is a usage-limit message whose time cannot be read
    (``looks_like_usage_limit`` tells those apart).
    """
    if not text:
        return None
    now = aware(now)
    epoch = _EPOCH_LIMIT_RE.search(text)
    if epoch:
        return from_epoch(epoch.group(1))
    phrase = _LIMIT_PHRASE_RE.search(text)
    if not phrase:
        return None
    reset = _RESET_RE.search(text, phrase.end())
    if not reset:
        return None
    return _parse_reset_when(reset.group("when"), now)


def _parse_reset_when(when: str, now: datetime) -> datetime | None:
    """``"Mon 9am (America/New_York)"``, ``"Nov 28, 5pm (UTC)"``, ``"4:20am"`` -> datetime."""
    when = when.split("\n", 1)[0]
    zone = _zone(when, now)
    if zone is None:
        return None
    clock_time, rest = _clock_time(when)
    local_now = now.astimezone(zone)
    month_day = _MONTH_DAY_RE.search(rest) or _DAY_MONTH_RE.search(rest)
    if month_day:
        return _on_date(month_day, rest, clock_time or time(0, 0), zone, local_now)
    if clock_time is None:
        return None
    weekday = _WEEKDAY_RE.search(rest)
    if weekday:
        target = _WEEKDAYS.index(weekday.group(1).lower())
        day = local_now.date() + timedelta(days=(target - local_now.weekday()) % 7)
        candidate = datetime.combine(day, clock_time, tzinfo=zone)
        return candidate if candidate > local_now else datetime.combine(
            day + timedelta(days=7), clock_time, tzinfo=zone)
    candidate = datetime.combine(local_now.date(), clock_time, tzinfo=zone)
    if candidate <= local_now:
        candidate = datetime.combine(local_now.date() + timedelta(days=1), clock_time, tzinfo=zone)
    return candidate


def _zone(when: str, now: datetime) -> ZoneInfo | timezone | None:
    match = _ZONE_RE.search(when)
    if not match:
        return now.tzinfo if isinstance(now.tzinfo, (ZoneInfo, timezone)) else timezone.utc
    name = match.group(1)
    if name.upper() in ("UTC", "GMT", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None  # a zone we cannot resolve: a guessed time would be worse than none


def _clock_time(when: str) -> tuple[time | None, str]:
    """The time of day in ``when`` and ``when`` without it (so "28" in "Nov 28" is not an hour)."""
    match = _AMPM_RE.search(when)
    if match:
        hour = int(match.group("h")) % 12 + (12 if match.group("ap").lower() == "p" else 0)
    else:
        match = _24H_RE.search(when)
        if not match:
            low = when.lower()
            if "midnight" in low:
                return time(0, 0), when
            if "noon" in low:
                return time(12, 0), when
            return None, when
        hour = int(match.group("h"))
    minute = int(match.group("m") or 0)
    if hour > 23 or minute > 59:
        return None, when
    return time(hour, minute), when[: match.start()] + " " + when[match.end():]


def _on_date(
    match: re.Match, rest: str, clock_time: time, zone: Any, local_now: datetime
) -> datetime | None:
    month = _MONTHS[match.group("mon")[:3].lower()]
    day = int(match.group("day"))
    year_match = _YEAR_RE.search(rest)
    year = int(year_match.group(1)) if year_match else local_now.year
    try:
        candidate = datetime.combine(date(year, month, day), clock_time, tzinfo=zone)
        # no year given and the date is well past: it means next year (a "Jan 2" seen in December)
        if not year_match and candidate < local_now - timedelta(days=1):
            candidate = datetime.combine(date(year + 1, month, day), clock_time, tzinfo=zone)
    except ValueError:  # Feb 30 and the like
        return None
    return candidate

