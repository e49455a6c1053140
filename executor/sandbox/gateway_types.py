"""What a job's API gateway is given (its upstream: model, credential, endpoint and the API protocol it speaks;
its limits; the executor's callbacks) and what it reports (a forwarded request's record, a refusal). Plain data:
``gateway.py`` makes and sends them.

Must never: hold the credential in a repr (``Upstream.credential`` is not shown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .api import ApiProtocol, RateLimitReading

AuthType = Literal["api_key", "oauth_token"]


@dataclass(frozen=True)
class Limits:
    """What one job's gateway may hold (settings: EXECUTOR_GATEWAY_CONNECTIONS, EXECUTOR_GATEWAY_PARSE_MEMORY)."""

    connections: int = 8
    parse_memory: int = 96 * 1024 * 1024


@dataclass(frozen=True)
class Upstream:
    """Where a job's requests go, as whom and in which API: exactly one model and one credential (no fallback).
    ``base_url`` empty: the protocol's public endpoint."""

    model: str
    credential: str = field(repr=False)
    auth_type: AuthType = "api_key"
    base_url: str = ""
    protocol: ApiProtocol | None = None

    def __post_init__(self) -> None:
        if self.protocol is None:
            raise ValueError("an upstream needs the API protocol its gateway speaks (the runner's agent's)")

    @property
    def api(self) -> ApiProtocol:
        assert self.protocol is not None
        return self.protocol

    @property
    def url(self) -> str:
        return self.base_url or self.api.default_base_url

    def auth_headers(self) -> dict[str, str]:
        return self.api.auth_headers(self.credential, self.auth_type)


@dataclass(frozen=True)
class RequestRecord:
    """One request the gateway forwarded (or failed to), as the executor's accounting sees it."""

    job_id: str
    method: str
    path: str  # with the query string
    status: int  # what the container got; 502 when the upstream could not be reached
    latency: float  # seconds from the request's arrival to the upstream's response head
    duration: float  # seconds from the request's arrival to the end of the response
    request_bytes: int
    response_bytes: int
    usage: dict[str, int]  # from the API's own response, in the executor's four counts
    rate_limits: dict[str, str]  # the protocol's rate-limit response headers, as they came
    model: str | None = None  # the model that answered (read from the answer), else the one asked for
    request_id: str | None = None  # the upstream's request id header
    error: str | None = None  # why the response is incomplete or synthetic, if it is
    message: str | None = None  # the API's error message, for an error answer
    weather: str | None = None  # rate_limited | overloaded: the protocol's word for a 429-like answer
    reading: RateLimitReading = field(default_factory=RateLimitReading)  # the rate-limit headers in numbers


@dataclass(frozen=True)
class Refusal:
    """A request the gateway answered itself without forwarding."""

    job_id: str
    kind: Literal["route", "model", "answer", "body"]  # answer: an answer named another model (cut)
    method: str
    path: str
    status: int
    reason: str
    requested_model: str | None = None
    expected_model: str | None = None


@dataclass(frozen=True)
class GatewayCallbacks:
    """Called on the gateway's loop thread: each must be quick and thread-safe (e.g. put on a queue)."""

    on_request: Callable[[RequestRecord], None] | None = None
    on_refusal: Callable[[Refusal], None] | None = None
    #: every chunk received from the upstream, pings included: the liveness watchdog's progress signal
    on_activity: Callable[[str], None] | None = None
