"""How a Claude Code run ended: success, rate limited, overloaded, auth error, API error or agent error.

Owns ``classify`` (from everything a ``StreamState`` saw and the CLI's exit code) into an ``Outcome``
(``agent/outcome.py``): the message, how long the API asked to wait, when a plan's usage limit resets. It
returns data, never raises.

Must never: talk to Docker, the database or the network.
"""

from __future__ import annotations

import re
from datetime import datetime

from ...clock import aware, from_epoch
from ..events import clip
from ..outcome import OUTCOME_KINDS, Outcome
from .stream import StreamState

__all__ = ["OUTCOME_KINDS", "Outcome", "classify"]

# Loose on purpose: wording changes between CLI and API versions.
_AUTH_RE = re.compile(
    r"invalid api key|authentication_error|authentication[_ ]failed|permission_error|"
    r"please run /login|oauth token (?:has )?expired|invalid (?:x-api-key|bearer token)",
    re.I,
)
# A spend cap / billing stop is a 429 (or 400/402) that waiting minutes will not fix.
_SPEND_CAP_RE = re.compile(
    r"spend(?:ing)? (?:limit|cap)|specified api usage limit|credit balance|billing|"
    r"out of credits|monthly (?:usage|spend)|budget (?:limit|exceeded)|"
    r"not retryable|no retry-after|without (?:a )?retry-after",
    re.I,
)
_OVERLOADED_RE = re.compile(r"overloaded", re.I)


def classify(state: StreamState, exit_code: int | None, now: datetime | None = None) -> Outcome:
    """How the run ended, from everything ``state`` saw and the CLI's exit code."""
    now = aware(now or state.clock())
    result = state.result
    ok_result = (
        result is not None
        and not result.get("is_error")
        and result.get("subtype") == "success"
        and exit_code in (0, None)
    )
    # A usage-limit text wins even over a "success" result: older CLIs returned it that way.
    if state.usage_limit_text:
        return _usage_limited(state, now)
    if ok_result:
        return Outcome("success", clip(state.final_text, 200) or "completed")
    errored = _classify_api_error(state, now)
    if errored is not None:
        return errored
    if result is None:
        return Outcome(
            "agent_error",
            f"the Claude CLI ended without a result line (exit code {exit_code}, {state.lines} "
            f"line(s) read, last activity: {state.last_activity or 'none'})",
        )
    if result.get("is_error") or result.get("subtype") != "success":
        text = clip(result.get("result") or "", 500)
        return Outcome(
            "agent_error",
            f"the agent's run ended with {result.get('subtype')} "
            f"(terminal_reason {result.get('terminal_reason')}, exit code {exit_code})"
            + (f": {text}" if text else ""),
        )
    return Outcome("agent_error", f"the Claude CLI exited {exit_code} after a success result")


def _classify_api_error(state: StreamState, now: datetime) -> Outcome | None:
    """auth > spend cap > rate limit > overload > other API error; None when no API error ended it.

    Only the CLI's own terminal reports decide that the run failed on an API error (an error result,
    an assistant line with ``error``, a rejected rate_limit_event): api_retry lines alone mean the
    CLI was retrying, and a run that recovered is judged by its result. Once failed, the retries'
    statuses help name the cause.
    """
    result = state.result or {}
    errored_result = bool(result.get("is_error"))
    rejected = [e for e in state.rate_limit_events if str(e.get("status") or "").lower() == "rejected"]
    if not (errored_result or state.assistant_errors or rejected):
        return None
    statuses = [r.get("error_status") for r in state.api_retries] + state.api_error_statuses
    kinds = [str(r.get("error") or "") for r in state.api_retries] + state.assistant_errors
    kinds += state.api_error_types
    signal = " ".join(kinds + [state.last_error_text])
    message = state.last_error_text or clip(result.get("result") or "", 500)

    if any(s in (401, 403) for s in statuses) or _AUTH_RE.search(signal):
        return Outcome("auth_error", message or "the API refused the credentials")
    limited = 429 in statuses or bool(rejected) or any("rate_limit" in k for k in kinds)
    if (limited or any("billing" in k for k in kinds)) and _SPEND_CAP_RE.search(signal):
        # a spend cap says so and carries no retry-after: waiting will not fix it
        return Outcome("api_error", message or "spend cap reached (not retryable)")
    if limited:
        resets_at = _rate_limit_reset(rejected)
        return Outcome(
            "rate_limited",
            message or "rate limited (429)",
            retry_after=_retry_after(state, resets_at, now),
            resets_at=resets_at,
        )
    if 529 in statuses or any("overload" in k for k in kinds) or _OVERLOADED_RE.search(signal):
        return Outcome(
            "overloaded",
            message or "the API is overloaded (529)",
            retry_after=_retry_after(state, None, now),
        )
    if state.result is None:
        return None  # an API error line but no result: the CLI died; "without a result" says more
    api_failed = result.get("terminal_reason") == "api_error" or state.api_error_statuses
    if state.assistant_errors or api_failed:
        cause = result.get("api_error_status") or (state.assistant_errors or [""])[-1]
        return Outcome("api_error", message or f"API error {cause}".strip())
    return None


def _usage_limited(state: StreamState, now: datetime) -> Outcome:
    resets_at = state.usage_limit_resets_at
    retry_after = max(0.0, (resets_at - now).total_seconds()) if resets_at else None
    text = clip(state.usage_limit_text or "", 300)
    if resets_at is not None:
        text = f"{text} (resets at {resets_at.isoformat()})"
    return Outcome("rate_limited", text, retry_after=retry_after, resets_at=resets_at)


def _rate_limit_reset(rejected: list[dict]) -> datetime | None:
    for event in reversed(rejected):
        when = from_epoch(event.get("resets_at"))
        if when is not None:
            return when
    return None


def _retry_after(state: StreamState, resets_at: datetime | None, now: datetime) -> float | None:
    """Seconds to wait: a window's reset time beats the CLI's own short backoff delay."""
    if resets_at is not None:
        return max(0.0, (resets_at - now).total_seconds())
    for retry in reversed(state.api_retries):
        delay = retry.get("retry_delay_ms")
        if isinstance(delay, (int, float)):
            return delay / 1000.0
    return None


