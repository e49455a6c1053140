"""The OpenAI Responses API as a sealed Codex job's gateway speaks it.

Owns the route the CLI calls (``POST /v1/responses``, the model in the body), the credential header (a bearer
token), the path sent upstream (the runner's base URL ends in ``/v1``, as Codex's own ``base_url`` does), the
answer's usage and model (``response.created`` / ``response.completed`` events, or a JSON body), its errors
(``{"error": {"message", "type", "code"}}``; ``response.failed`` events), the rate-limit headers
(``retry-after``, ``retry-after-ms``, ``x-ratelimit-*``) and what they say in numbers, and which answers are
weather (429 unless it is a spent quota, and 503).

Facts: Codex 0.169.0 (``codex exec``, a custom provider with ``wire_api = "responses"``) sends nothing else to
its base URL but ``POST {base_url}/responses`` with ``stream: true``; it never names the model that answered
in its own stream, so the gateway reads it from each answer and cuts one from another model
(``checks_answers``).

Must never: hold a credential, or keep more of an answer than ``ResponseMeter`` bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ...sandbox.api import ApiProtocol, RateLimitReading, Route, json_error, retry_after_seconds
from ...sandbox.usage import ResponseMeter

ROUTE = ("POST", "/v1/responses")
PUBLIC_API = "https://api.openai.com/v1"
#: Errors that are not weather however they are answered: waiting does not fix a spent quota.
SPENT = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
_EVENTS = (b'"response.created"', b'"response.in_progress"', b'"response.completed"', b'"response.failed"',
           b'"response.incomplete"', b'"error"')


class ResponsesMeter(ResponseMeter):
    """Usage and model from ``response.created`` / ``response.completed`` (or a JSON body), errors."""

    def _wanted(self, line: bytes) -> bool:
        return any(name in line for name in _EVENTS)

    def _event(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "error":
            self._error(data)
        elif isinstance(data.get("response"), dict):
            self._body(data["response"])

    def _body(self, body: dict) -> None:
        if isinstance(body.get("model"), str):
            self.model = body["model"]
        usage = body.get("usage")
        if isinstance(usage, dict):
            self._merge(_counts(usage))
        if isinstance(body.get("error"), dict):
            self._error(body["error"])

    def _error(self, error: dict) -> None:
        if isinstance(error.get("message"), str):
            self.error = error["message"][:500]
        code = error.get("code") or error.get("type")
        if isinstance(code, str):
            self.error_code = code[:100]
        wait = re.search(r"try again in (\d+(?:\.\d+)?)(ms|s)\b", self.error or "")
        if wait:
            self.retry_after = float(wait.group(1)) / (1000 if wait.group(2) == "ms" else 1)


def _counts(usage: dict) -> dict[str, int]:
    """The Responses API's usage in the executor's counts: its input tokens include the cached ones."""
    counts: dict[str, int] = {}
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(usage.get("input_tokens"), int):
        counts["input_tokens"] = usage["input_tokens"] - (cached if isinstance(cached, int) else 0)
    if isinstance(cached, int):
        counts["cache_read_input_tokens"] = cached
    if isinstance(usage.get("output_tokens"), int):
        counts["output_tokens"] = usage["output_tokens"]
    return counts


class Responses(ApiProtocol):
    name = "openai-responses"
    default_base_url = PUBLIC_API
    credential_headers = frozenset({"authorization", "openai-organization", "openai-project"})
    checks_answers = True

    def route(self, method: str, path: str) -> Route | None:
        return Route("body") if (method, path) == ROUTE else None

    def forward_path(self, path: str, query: str) -> str:
        # the upstream base URL ends in /v1 already (the runner's, or the public API's)
        return path.removeprefix("/v1") + (f"?{query}" if query else "")

    def auth_headers(self, credential: str, auth_type: str) -> dict[str, str]:
        return {"authorization": f"Bearer {credential}"}

    def meter(self, content_type: str) -> ResponseMeter:
        return ResponsesMeter(content_type)

    def rate_limit_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items()
                if k in ("retry-after", "retry-after-ms") or k.startswith("x-ratelimit-")}

    def reading(self, headers: Mapping[str, str], meter: ResponseMeter | None = None) -> RateLimitReading:
        after_ms = _float(headers.get("retry-after-ms"))
        retry_after = (after_ms / 1000 if after_ms is not None
                       else retry_after_seconds(headers.get("retry-after")))
        if retry_after is None and meter is not None:
            retry_after = meter.retry_after
        return RateLimitReading(
            retry_after=retry_after,
            requests_remaining=_int(headers.get("x-ratelimit-remaining-requests")),
            requests_reset=duration(headers.get("x-ratelimit-reset-requests")),
            tokens_remaining=_int(headers.get("x-ratelimit-remaining-tokens")),
            tokens_reset=duration(headers.get("x-ratelimit-reset-tokens")))

    def weather(self, status: int, meter: ResponseMeter | None = None) -> str | None:
        if status == 429 and meter is not None and meter.error_code in SPENT:
            return None  # a spent quota: no wait fixes it, the run fails as the API said
        return {429: "rate_limited", 503: "overloaded"}.get(status)

    def error(self, status: int, type_: str, message: str, retry: bool = False
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return json_error(status, {"error": {"message": message, "type": type_, "param": None, "code": type_}})


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value: str | None) -> float | None:
    """A reset time as the API gives it (``1s``, ``6m0s``, ``250ms``, ``1h2m3.5s``) in seconds."""
    if not value:
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _UNIT[u] for n, u in parts)


RESPONSES = Responses()
