"""The small model that writes session briefs for Claude Code runners, through the ``anthropic`` SDK.

Owns the call through the runner's endpoint (``base_url``, the public API by default) with its credential (an
API key, or an OAuth token as a bearer token), the SDK's own retries off (``session.summarizer`` backs off on
429 and 529, same model), the Claude price table, and the words for an SDK error.

Must never: fall back to another model, or let the SDK read a credential or endpoint from the environment
(it is given both).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ...session.summarizer import SUMMARY_TOKENS, SYSTEM, Answer, CallFailed
from ...session.summarizer import Summarizer as Base
from .api import PUBLIC_API

#: What the API asks of a request authenticated with an OAuth token (the CLI sends the same).
OAUTH_BETA = "oauth-2025-04-20"


class Summarizer(Base):
    """The small model through the Messages API."""

    prices = {
        "claude-haiku-4-5": (1.0, 5.0),
        "claude-3-5-haiku": (0.8, 4.0),
        "claude-haiku-3-5": (0.8, 4.0),
        "claude-3-haiku": (0.25, 1.25),
    }

    def __init__(self, model: str, credential: str, base_url: str | None = None, auth_type: str = "api_key",
                 attempts: int = 4, backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import anthropic

        super().__init__(model, attempts, backoff, sleep)
        auth = ({"api_key": credential} if auth_type == "api_key"
                else {"auth_token": credential, "default_headers": {"anthropic-beta": OAUTH_BETA}})
        # The SDK's own retries are off: the backoff of the base class is the one in control, and it is recorded.
        self.client = anthropic.Anthropic(base_url=base_url or PUBLIC_API, max_retries=0, timeout=120.0, **auth)

    def _ask(self, prompt: str) -> Answer:
        response = self.client.messages.create(model=self.model, max_tokens=SUMMARY_TOKENS, system=SYSTEM,
                                               messages=[{"role": "user", "content": prompt}])
        text = "".join(getattr(b, "text", "") for b in response.content)
        return Answer(text, response.model, response.usage.input_tokens, response.usage.output_tokens, 0.0)

    def retryable(self, exc: BaseException) -> bool:
        import anthropic

        if isinstance(exc, CallFailed):  # an SDK error already told in the base's words (``why``)
            return exc.retryable
        if isinstance(exc, (anthropic.RateLimitError, anthropic.OverloadedError)):
            return True
        return isinstance(exc, anthropic.APIStatusError) and exc.status_code in (429, 529)

    def why(self, exc: BaseException) -> str:
        import anthropic

        if isinstance(exc, anthropic.APIStatusError):
            exc = CallFailed(exc.status_code, exc.message, self.retryable(exc))
        return super().why(exc)
