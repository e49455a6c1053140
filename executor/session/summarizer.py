"""The small model that writes the brief's summaries: what every agent's provider call shares.

Owns ``Summarizer``, the base each agent's package implements for its provider (``_ask``: one call, made
through the job's runner: its endpoint and its credential, with the pinned model id the runner names): the
tenacity backoff on retryable answers against the same model (the provider's own retries off, so the recorded
backoff is the one in control), the check that the model that answered is the one asked for, the price table
that turns tokens into a cost, and the words that say why the model could not be had; ``Answer``; and
``CallFailed``, how a provider's refusal is told without its SDK's types.

Must never: fall back to another model, log the credential, or take a credential or endpoint from anywhere
but the runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import CompactionUnavailable

SUMMARY_TOKENS = 300
SYSTEM = ("You condense the history of a coding session for the agent that continues it. Be terse and "
          "factual; never quote code; no preamble.")


def estimate_tokens(size: int) -> int:
    """Tokens of a request from its size in bytes (the same measure for every mode)."""
    return max(1, round(size / 4))


@dataclass
class Answer:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency: float


class CallFailed(Exception):
    """The provider answered something that is not a summary: its HTTP status (None: unreachable) and message."""

    def __init__(self, status: int | None, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable


class Summarizer:
    """The small model through one provider, with tenacity backoff on retryable answers (same model)."""

    #: USD per million tokens (input, output), by model id prefix.
    prices: dict[str, tuple[float, float]] = {}

    def __init__(self, model: str, attempts: int = 4, backoff: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.model = model
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep

    def __call__(self, prompt: str) -> Answer:
        started = time.monotonic()
        retrying = Retrying(retry=retry_if_exception(self.retryable), stop=stop_after_attempt(self.attempts),
                            wait=wait_exponential(multiplier=self.backoff, max=60), sleep=self.sleep, reraise=True)
        answer = retrying(self._ask, prompt)
        if answer.model != self.model:
            raise CompactionUnavailable(f"model {answer.model!r} answered instead of {self.model!r} "
                                        "(no fallback to another model)")
        if not answer.text.strip():
            raise CompactionUnavailable(f"{self.model} returned an empty summary")
        answer.text = answer.text.strip()
        answer.latency = time.monotonic() - started
        return answer

    def _ask(self, prompt: str) -> Answer:
        """One call of the provider (latency is filled in by the caller)."""
        raise NotImplementedError

    def retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is weather worth another call of the same model (a rate limit, an overload)."""
        return isinstance(exc, CallFailed) and exc.retryable

    def why(self, exc: BaseException) -> str:
        """Why the model could not be had, for the job's record."""
        if isinstance(exc, CompactionUnavailable):
            return str(exc)
        if isinstance(exc, CallFailed) and exc.status is not None:
            after = f" after {self.attempts} attempts" if self.retryable(exc) else ""
            return f"{self.model} answered {exc.status}{after}: {exc.message}"[:500]
        return f"{self.model} could not be reached: {type(exc).__name__}: {exc}"[:500]

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float | None:
        for prefix, (price_in, price_out) in self.prices.items():
            if model.startswith(prefix):
                return round((input_tokens * price_in + output_tokens * price_out) / 1e6, 6)
        return None


def why_unavailable(exc: BaseException, summarizer: Summarizer | None) -> str:
    if summarizer is not None:
        return summarizer.why(exc)
    return str(exc)[:500]
