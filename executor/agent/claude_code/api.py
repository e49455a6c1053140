"""The Anthropic Messages API as a sealed Claude Code job's gateway speaks it.

Owns the one route the CLI calls, the credential headers (``x-api-key`` for an API key, a bearer token for an
OAuth token), the answer's usage and model (``message_start`` / ``message_delta`` events, or a JSON body), its
errors (``{"type": "error", "error": {...}}``, with the API's ``x-should-retry`` hint), the rate-limit headers
(``retry-after``, ``anthropic-ratelimit-*``) and what they say in numbers, and which answers are weather (429,
and 529: overloaded).

Facts: the real CLI 2.1.328 in ``-p`` mode, with the sandbox's environment (proxy variables set), sends nothing
else to its base URL but ``POST /v1/messages?beta=true``, api_key and oauth_token alike (with no proxy
variables and non-essential traffic on, it also sends ``HEAD /api/hello``; refusing it does not disturb the
run). The CLI names the model that answered in its own stream, so answers are not cut here (the executor
reads the stream).

Must never: hold a credential, or keep more of an answer than ``ResponseMeter`` bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ...sandbox.api import ApiProtocol, RateLimitReading, Route, json_error, retry_after_seconds
from ...sandbox.usage import ResponseMeter

ROUTE = ("POST", "/v1/messages")
PUBLIC_API = "https://api.anthropic.com"


class MessagesMeter(ResponseMeter):
    """Usage from ``message_start`` / ``message_delta`` (or a JSON body), the model that answered, errors."""

    def _wanted(self, line: bytes) -> bool:
        # Only two event types carry usage (and error events a message)
        return b'"message_start"' in line or b'"message_delta"' in line or b'"error"' in line

    def _event(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if data.get("type") == "message_start":
            message = data.get("message") or {}
            self._usage(message.get("usage"))
            if isinstance(message.get("model"), str):
                self.model = message["model"]
        elif data.get("type") == "message_delta":
            self._usage(data.get("usage"))  # cumulative counts: later values replace earlier ones
        elif data.get("type") == "error" and isinstance(data.get("error"), dict):
            self._error(data["error"])

    def _body(self, body: dict) -> None:
        self._usage(body.get("usage"))
        self.model = body.get("model") if isinstance(body.get("model"), str) else self.model
        if isinstance(body.get("error"), dict):
            self._error(body["error"])

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._merge(usage)  # the API's own names are the executor's

    def _error(self, error: dict) -> None:
        if isinstance(error.get("message"), str):
            self.error = error["message"][:500]
        if isinstance(error.get("type"), str):
            self.error_code = error["type"][:100]


class Messages(ApiProtocol):
    name = "anthropic-messages"
    default_base_url = PUBLIC_API
    credential_headers = frozenset({"x-api-key", "authorization"})

    def route(self, method: str, path: str) -> Route | None:
        return Route("body") if (method, path) == ROUTE else None

    def auth_headers(self, credential: str, auth_type: str) -> dict[str, str]:
        if auth_type == "api_key":
            return {"x-api-key": credential}
        return {"authorization": f"Bearer {credential}"}

    def meter(self, content_type: str) -> ResponseMeter:
        return MessagesMeter(content_type)

    def rate_limit_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k == "retry-after" or k.startswith("anthropic-ratelimit-")}

    def reading(self, headers: Mapping[str, str], meter: ResponseMeter | None = None) -> RateLimitReading:
        now = datetime.now(timezone.utc)
        return RateLimitReading(
            retry_after=retry_after_seconds(headers.get("retry-after")),
            requests_remaining=_int(headers.get("anthropic-ratelimit-requests-remaining")),
            requests_reset=_until(headers.get("anthropic-ratelimit-requests-reset"), now),
            tokens_remaining=_int(headers.get("anthropic-ratelimit-tokens-remaining")),
            tokens_reset=_until(headers.get("anthropic-ratelimit-tokens-reset"), now))

    def weather(self, status: int, meter: ResponseMeter | None = None) -> str | None:
        return {429: "rate_limited", 529: "overloaded"}.get(status)

    def error(self, status: int, type_: str, message: str, retry: bool = False
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        # x-should-retry is the API's own hint to its SDKs on whether to try again
        return json_error(status, {"type": "error", "error": {"type": type_, "message": message}}, retry)

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("request-id")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _until(value: str | None, now: datetime) -> float | None:
    """An RFC 3339 reset time as seconds from now."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - now).total_seconds())


MESSAGES = Messages()
