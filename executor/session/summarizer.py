"""The small model that writes the brief's summaries, through the ``anthropic`` SDK.

Owns the call (tenacity backoff on 429/529 against the same model, the SDK's own retries off so the
recorded backoff is the one in control), made through the job's runner: its endpoint (``base_url``, the
public API by default) and its credential (an API key, or an OAuth token as a bearer token), with the
pinned model id ``EXECUTOR_COMPACTION_MODEL``; the check that the model that answered is the one asked for;
the price table that turns tokens into a cost; and the words that say why the model could not be had.

Must never: fall back to another model, log the credential, or take a credential or endpoint from anywhere
but the runner (the SDK is given both, so it consults no environment variable for them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import CompactionUnavailable
from ..policy import Runner
from ..settings import Settings

SUMMARY_TOKENS = 300
PUBLIC_API = "https://api.anthropic.com"
#: What the API asks of a request authenticated with an OAuth token (the CLI sends the same).
OAUTH_BETA = "oauth-2025-04-20"

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

    def __init__(self, model: str, credential: str, base_url: str | None = None, auth_type: str = "api_key",
                 attempts: int = 4, backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import anthropic

        self.model = model
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep
        auth = ({"api_key": credential} if auth_type == "api_key"
                else {"auth_token": credential, "default_headers": {"anthropic-beta": OAUTH_BETA}})
        # The SDK's own retries are off: the backoff below is the one in control, and it is recorded.
        self.client = anthropic.Anthropic(base_url=base_url or PUBLIC_API, max_retries=0, timeout=120.0, **auth)

    @classmethod
    def from_settings(cls, settings: Settings, secrets: Mapping[str, str], runner: Runner) -> Summarizer:
        """The small model through ``runner``'s endpoint and credential."""
        credential = secrets.get(runner.auth_env)
        if not credential:
            raise CompactionUnavailable(
                f"the small model's credential is missing: runner {runner.name!r}'s {runner.auth_env} is not set "
                "in the executor's environment")
        return cls(settings.compaction_model, credential, runner.base_url, runner.auth_type,
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


