"""What a job's API gateway must know of the model API it stands in front of: the seam between the gateway
(one for every agent) and each agent's API protocol (implemented in the agent's package).

Owns ``ApiProtocol``, the questions the gateway asks of a protocol: which (method, path) a job may call and
where such a request names its model (``Route``), the headers that carry a credential (removed from every
request) and those that present the real one, the path sent upstream, how to read an answer as it streams
past (``usage.ResponseMeter``: usage, the model that answered, errors), which answers are weather (a rate
limit or an overload: the runner rests), the rate-limit headers worth keeping and what they say in numbers
(``RateLimitReading``: what pacing reads), an error shaped like the API's own, and whether an answer naming
another model is cut as soon as it shows (for agents whose stream never names it).

Must never: hold a credential (it is handed one per request), or know anything of a particular API: that
belongs to the agent packages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Literal

from .usage import ResponseMeter

#: Where a route's request names the model it asks for.
ModelIn = Literal["body", "path", "none"]


@dataclass(frozen=True)
class Route:
    """An allowed call: where its model is named, and the model its path names (``model_in == "path"``)."""

    model_in: ModelIn = "body"
    path_model: str | None = None


@dataclass(frozen=True)
class RateLimitReading:
    """What an answer's rate-limit headers (or its error body) say, in numbers, whatever the API's spelling:
    how much is left of the current windows and when they reset (seconds from the answer), and how long the
    API asked to wait. None: the API did not say."""

    retry_after: float | None = None
    requests_remaining: int | None = None
    requests_reset: float | None = None
    tokens_remaining: int | None = None
    tokens_reset: float | None = None


class ApiProtocol:
    """One model API as its gateway sees it. Subclasses live in the agent packages."""

    name = "api"
    #: The public endpoint a runner without ``base_url`` reaches.
    default_base_url = ""
    #: Request headers that carry a credential: removed from every request (the container holds a placeholder).
    credential_headers: frozenset[str] = frozenset({"authorization"})
    #: Cut an answer as soon as it shows another model than the runner's (the agent's stream never names it).
    checks_answers = False

    def route(self, method: str, path: str) -> Route | None:
        """The route of an allowed call (the path without its query), or None: refused."""
        raise NotImplementedError

    def forward_path(self, path: str, query: str) -> str:
        """The path and query sent upstream."""
        return path + (f"?{query}" if query else "")

    def auth_headers(self, credential: str, auth_type: str) -> dict[str, str]:
        """The headers presenting the real credential."""
        raise NotImplementedError

    def meter(self, content_type: str) -> ResponseMeter:
        """A reader of one answer as it streams past."""
        raise NotImplementedError

    def rate_limit_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The answer's headers worth keeping about rate limits (stored as they came)."""
        return {k: v for k, v in headers.items() if k == "retry-after"}

    def reading(self, headers: Mapping[str, str], meter: ResponseMeter | None = None) -> RateLimitReading:
        """What the rate-limit headers (and an error body's retry delay) say, in numbers."""
        return RateLimitReading(retry_after=_first(meter.retry_after if meter else None,
                                                   retry_after_seconds(headers.get("retry-after"))))

    def weather(self, status: int, meter: ResponseMeter | None = None) -> str | None:
        """``rate_limited`` or ``overloaded`` for an answer that is weather (the runner rests), else None."""
        return {429: "rate_limited", 503: "overloaded", 529: "overloaded"}.get(status)

    def error(self, status: int, type_: str, message: str, retry: bool = False
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """An answer the gateway gives itself, shaped like the API's own errors."""
        raise NotImplementedError

    def request_id(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-request-id")


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``retry-after`` header in seconds: a number of seconds, or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def json_error(status: int, body: dict, retry: bool | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``body`` as a JSON answer with ``status``; ``retry`` adds ``x-should-retry`` (a hint some SDKs read)."""
    import json

    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry is not None:
        headers.append((b"x-should-retry", b"true" if retry else b"false"))
    return status, headers, data
