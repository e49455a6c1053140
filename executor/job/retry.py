"""Retry decisions: whether an attempt that met a rate limit runs again, and when.

Owns the backoff arithmetic, done with tenacity's own strategies: retryability is a property of the
error (``ExecutorError.retryable``) and one tenacity predicate reads it; ``stop_after_attempt`` counts
the attempts; ``wait_exponential`` spaces them (``backoff_initial`` x ``backoff_multiplier`` ^ n, capped
by ``backoff_max``). When the API said how long to wait (a retry-after, a usage limit's reset time) and
that is longer, the job waits for that instead. A usage limit with a known reset does not use up an
attempt: waiting for the reset is the whole remedy.

Must never: pick another runner or model (a retry is always against the same runner), or sleep: the
caller frees the slot and the job waits in the queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from ..errors import ExecutorError
from ..policy import Policy

#: the one predicate: an error says itself whether waiting can cure it
retryable = retry_if_exception(lambda exc: isinstance(exc, ExecutorError) and exc.retryable)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay: float  # seconds to wait before the next attempt
    counts: bool  # whether the attempt that just ended uses up one of max_attempts
    why: str


def _state(attempt: int, error: BaseException) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def decide(policy: Policy, error: ExecutorError, limited_attempts: int, now: datetime,
           resets_at: datetime | None = None, retry_after: float | None = None) -> RetryDecision:
    """What happens after an attempt ended with ``error``.

    ``limited_attempts``: attempts that counted so far, including the one that just ended.
    """
    state = _state(max(1, limited_attempts), error)
    if not retryable(state):
        return RetryDecision(False, 0.0, False, "not a retryable error")
    if resets_at is not None and resets_at > now:
        # A plan's usage limit says when it resets: wait until then, without spending an attempt.
        return RetryDecision(True, (resets_at - now).total_seconds(), False, "usage limit resets")
    if stop_after_attempt(policy.max_attempts)(state):
        return RetryDecision(False, 0.0, True, f"{limited_attempts} attempts used (max_attempts)")
    backoff = wait_exponential(multiplier=policy.backoff_initial, exp_base=policy.backoff_multiplier,
                               max=policy.backoff_max)(state)
    if retry_after is not None and retry_after > backoff:
        return RetryDecision(True, float(retry_after), True, "the API's retry-after")
    return RetryDecision(True, float(backoff), True, "exponential backoff")
