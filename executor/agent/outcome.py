"""How an agent run ended, in the executor's words: success, rate limited, overloaded, auth error, API error
or agent error, whatever agent CLI ran.

Owns ``Outcome``, which says what a person or the retry logic needs: the message, how long the API asked to
wait, when a plan's usage limit resets. Each agent's package classifies its own run into one (its stream's
signals are its own); ``Outcome.to_error`` builds the matching exception, never raises it.

Must never: talk to Docker, the database or the network, or read an agent's stream itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..errors import AgentFailed, ApiError, AuthFailed, Overloaded, RateLimited

OUTCOME_KINDS = ("success", "rate_limited", "overloaded", "auth_error", "api_error", "agent_error")


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``kind`` is one of ``OUTCOME_KINDS``."""

    kind: str
    message: str
    retry_after: float | None = None
    resets_at: datetime | None = None

    def to_error(self, **context: object) -> AgentFailed | None:
        """The exception that describes this outcome (not raised), or None for success."""
        if self.kind == "success":
            return None
        if self.kind == "overloaded":
            return Overloaded(self.message, retry_after=self.retry_after, **context)
        if self.kind == "rate_limited":
            return RateLimited(
                self.message, retry_after=self.retry_after, resets_at=self.resets_at, **context
            )
        error = {"auth_error": AuthFailed, "api_error": ApiError}.get(self.kind, AgentFailed)
        return error(self.message, kind=self.kind, **context)
