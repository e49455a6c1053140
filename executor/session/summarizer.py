"""The small model that writes the brief's summaries, through the ``anthropic`` SDK.

Owns the call (tenacity backoff on 429/529 against the same model, the SDK's own retries off so the
recorded backoff is the one in control), the check that the model that answered is the one asked for, the
price table that turns tokens into a cost, and the words that say why the model could not be had.

Must never: fall back to another model, or log the key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import CompactionUnavailable
from ..settings import Settings

SUMMARY_TOKENS = 300

#: USD per million tokens (input, output), by model id prefix.
PRICES = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-haiku-3-5": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}

SYSTEM = ("You condense the history of a coding session for the agent that continues it. Be terse and "
          "factual; never quote code; no preamble.")


def estimate_tokens(size: int) -> int:
    """Tokens of a request from its size in bytes (the same measure for every mode)."""
    return max(1, round(size / 4))


def cost_of(model: str, input_tokens: int, output_tokens: int) -> float | None:
    for prefix, (price_in, price_out) in PRICES.items():
        if model.startswith(prefix):
            return round((input_tokens * price_in + output_tokens * price_out) / 1e6, 6)
    return None


@dataclass
class Answer:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency: float


def _retryable(exc: BaseException) -> bool:
    import anthropic

    if isinstance(exc, (anthropic.RateLimitError, anthropic.OverloadedError)):
        return True
    return isinstance(exc, anthropic.APIStatusError) and exc.status_code in (429, 529)


class Summarizer:
    """The small model, through the anthropic SDK, with tenacity backoff on 429/529 (same model)."""

    def __init__(self, model: str, api_key: str, base_url: str | None = None, attempts: int = 4,
                 backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import anthropic

        self.model = model
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep
        # The SDK's own retries are off: the backoff below is the one in control, and it is recorded.
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=120.0)

    @classmethod
    def from_settings(cls, settings: Settings, secrets: Mapping[str, str]) -> Summarizer:
        key = secrets.get(settings.compaction_auth_env)
        if not key:
            raise CompactionUnavailable(
                f"the small model's key is missing: {settings.compaction_auth_env} "
                "(EXECUTOR_COMPACTION_AUTH_ENV) is not set in the executor's environment")
        return cls(settings.compaction_model, key, settings.compaction_base_url,
                   attempts=settings.compaction_attempts, backoff=settings.compaction_backoff)

    def __call__(self, prompt: str) -> Answer:
        started = time.monotonic()
        retrying = Retrying(retry=retry_if_exception(_retryable), stop=stop_after_attempt(self.attempts),
                            wait=wait_exponential(multiplier=self.backoff, max=60), sleep=self.sleep, reraise=True)
        response = retrying(self.client.messages.create, model=self.model, max_tokens=SUMMARY_TOKENS,
                            system=SYSTEM, messages=[{"role": "user", "content": prompt}])
        if response.model != self.model:
            raise CompactionUnavailable(f"model {response.model!r} answered instead of {self.model!r} "
                                        "(no fallback to another model)")
        text = "".join(getattr(b, "text", "") for b in response.content).strip()
        if not text:
            raise CompactionUnavailable(f"{self.model} returned an empty summary")
        return Answer(text, response.model, response.usage.input_tokens, response.usage.output_tokens,
                      time.monotonic() - started)


def why_unavailable(exc: BaseException, summarizer: Summarizer | None) -> str:
    import anthropic

    if isinstance(exc, CompactionUnavailable):
        return str(exc)
    if isinstance(exc, anthropic.APIStatusError):
        after = f" after {summarizer.attempts} attempts" if summarizer and _retryable(exc) else ""
        return f"{getattr(summarizer, 'model', 'the small model')} answered {exc.status_code}{after}: {exc.message}"[:500]
    return f"{getattr(summarizer, 'model', 'the small model')} could not be reached: {type(exc).__name__}: {exc}"[:500]


