"""Host side of a job's model API access: one HTTP gateway per job, on a Unix socket that is mounted into
the job's container, forwarding the CLI's API calls to the runner's upstream with the real credential.

Owns: which API routes a job may call, swapping the container's placeholder credential for the real one
on every request, refusing any model but the runner's, streaming responses back unbuffered, and the
per-request accounting (status, latency, bytes, usage, rate-limit headers) and liveness signal that it
reports through callbacks. All job gateways share one event loop in one thread (``loop.LoopThread``);
``Gateways.add_job`` / ``remove_job`` may be called from any other thread.

Must never: let the real credential reach the container (not in a header, a body or an error message),
hold back a streamed response, retry a request itself (the CLI and the executor own retries), parse
HTTP by hand (uvicorn and httpx do), or block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx2
import uvicorn
from uvicorn.server import ServerState

from .loop import HOP_BY_HOP, JobServers, LoopThread, notify
from .usage import ResponseMeter, api_error, loads, rate_limit_headers

log = logging.getLogger(__name__)

AuthType = Literal["api_key", "oauth_token"]
DEFAULT_BASE_URL = "https://api.anthropic.com"

#: The only (method, path) pairs a job may call. The real CLI 2.1.328 in ``-p`` mode, with the sandbox's
#: environment (proxy variables set), sends nothing else to ANTHROPIC_BASE_URL: POST /v1/messages?beta=true,
#: api_key and oauth_token alike. (With no proxy variables and non-essential traffic on, it also sends
#: HEAD /api/hello; refusing it does not disturb the run.) The agent's own commands can reach the gateway
#: too: this list and the model check are what keep them to the runner's model.
ALLOWED_ROUTES = frozenset({("POST", "/v1/messages")})
#: Routes that must carry the runner's model in their JSON body.
MODEL_ROUTES = frozenset({"/v1/messages"})

#: A refused model is answered 400 invalid_request_error. The CLI does not back off on it: it re-sends at
#: most a few variants of the request at once (no thinking display, other tool set), then ends the run,
#: exit 1, quoting our message. 403 stops it after one request but reads as "Failed to authenticate"
#: (error authentication_failed), which the executor's stream classifier would take for a bad credential.
MODEL_MISMATCH_STATUS = 400
MAX_BODY = 32 * 1024 * 1024  # the API's own request limit

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded; host and
# content-length are recomputed by httpx for the upstream connection.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-api-key", "authorization", "accept-encoding"}
_RESPONSE_DROP = HOP_BY_HOP


@dataclass(frozen=True)
class Upstream:
    """Where a job's requests go and as whom: exactly one model and one credential (no fallback)."""

    model: str
    credential: str = field(repr=False)
    auth_type: AuthType = "api_key"
    base_url: str = DEFAULT_BASE_URL

    def auth_headers(self) -> dict[str, str]:
        if self.auth_type == "api_key":
            return {"x-api-key": self.credential}
        return {"authorization": f"Bearer {self.credential}"}


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
    usage: dict[str, int]  # from the API's own response: message_start / message_delta or JSON body
    rate_limits: dict[str, str]  # retry-after and anthropic-ratelimit-* response headers
    model: str | None = None  # the model that answered (message_start / JSON body), else the one asked for
    request_id: str | None = None  # the upstream's request-id header
    error: str | None = None  # why the response is incomplete or synthetic, if it is
    message: str | None = None  # the API's error message, for an error answer


@dataclass(frozen=True)
class Refusal:
    """A request the gateway answered itself without forwarding."""

    job_id: str
    kind: Literal["route", "model", "body"]
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


# -------------------------------------------------------------------------------------------- the app


@dataclass
class _Call:
    """One request as it is being handled."""

    method: str
    path: str  # with the query string
    started: float = field(default_factory=time.monotonic)
    request_bytes: int = 0
    model: str | None = None  # the model the request asked for


class JobApp:
    """The ASGI app of one job's gateway."""

    def __init__(self, job_id: str, upstream: Upstream, callbacks: GatewayCallbacks,
                 client: httpx2.AsyncClient) -> None:
        self.job_id = job_id
        self.upstream = upstream
        self.callbacks = callbacks
        self.client = client

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served; nothing else arrives
        method, route = scope["method"], scope["path"]
        call = _Call(method, route + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else ""))
        if (method, route) not in ALLOWED_ROUTES:
            await self._refuse(send, call, "route", 403, "permission_error",
                               f"{method} {route} is not an API route this sandbox may call")
            return
        try:
            body = await _read_body(receive)
        except _ClientGone:
            return  # hung up before its request was complete: nobody is left to answer
        if body is None:
            await self._refuse(send, call, "body", 413, "request_too_large",
                               f"request body larger than {MAX_BODY} bytes")
            return
        call.request_bytes = len(body)
        if route in MODEL_ROUTES and not await self._model_ok(send, call, body):
            return
        await self._forward(scope, receive, send, call, body)

    async def _model_ok(self, send: Callable, call: _Call, body: bytes) -> bool:
        parsed = loads(body)
        if not isinstance(parsed, dict):
            await self._refuse(send, call, "body", 400, "invalid_request_error", "request body is not a JSON object")
            return False
        requested = parsed.get("model")
        call.model = requested if isinstance(requested, str) else None
        if requested == self.upstream.model:
            return True
        await self._refuse(send, call, "model", MODEL_MISMATCH_STATUS, "invalid_request_error",
                           f"model {requested!r} is not allowed in this sandbox: the job's runner uses "
                           f"{self.upstream.model!r} only", requested=str(requested))
        return False

    async def _refuse(self, send: Callable, call: _Call, kind: str, status: int, type_: str, message: str,
                      requested: str | None = None) -> None:
        # Reported before the answer leaves: the executor knows why before the CLI can react to it.
        notify(self.callbacks.on_refusal, Refusal(
            self.job_id, kind, call.method, call.path, status, message, requested_model=requested,
            expected_model=self.upstream.model if kind == "model" else None))
        status, headers, body = api_error(status, type_, message)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _upstream_headers(self, scope: dict) -> list[tuple[str, str]]:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in _REQUEST_DROP]
        # identity: usage is read from the body as it passes; the API does not compress SSE anyway
        headers.append(("accept-encoding", "identity"))
        headers.extend(self.upstream.auth_headers().items())
        return headers

    async def _forward(self, scope: dict, receive: Callable, send: Callable, call: _Call, body: bytes) -> None:
        request = self.client.build_request(call.method, call.path, headers=self._upstream_headers(scope),
                                            content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx2.HTTPError as exc:
            # The CLI retries a 502 like any 5xx: an unreachable upstream is worth another try.
            status, headers, payload = api_error(502, "api_error", f"gateway: upstream unreachable "
                                                                    f"({type(exc).__name__})", retry=True)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            self._record(call, status, time.monotonic(), error=f"upstream: {type(exc).__name__}: {exc}")
            return
        head_at = time.monotonic()
        meter = ResponseMeter(response.headers.get("content-type", ""))
        error = None
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in response.headers.multi_items() if k not in _RESPONSE_DROP]})
            error = await self._relay(response, receive, send, meter)
        finally:
            await response.aclose()
            self._record(call, response.status_code, head_at, meter, response, error)

    async def _relay(self, response: httpx2.Response, receive: Callable, send: Callable,
                     meter: ResponseMeter) -> str | None:
        """Pass the body on chunk by chunk until it ends or the container hangs up; why it was cut short."""
        pump = asyncio.ensure_future(self._pump(response, send, meter))
        # A hang-up is only seen by receive(): without this, a stalled upstream stream would be kept
        # open for a client that is long gone (uvicorn's send() ignores a closed connection).
        hangup = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            hangup.cancel()
            await asyncio.gather(pump, hangup, return_exceptions=True)  # let both settle before aclose()
        if pump.cancelled():
            return "client disconnected"
        exc = pump.exception()
        if exc is None:
            return None
        if isinstance(exc, httpx2.HTTPError):
            return f"upstream: {type(exc).__name__}: {exc}"
        raise exc

    async def _pump(self, response: httpx2.Response, send: Callable, meter: ResponseMeter) -> None:
        async for chunk in response.aiter_raw():
            meter.feed(chunk)
            notify(self.callbacks.on_activity, self.job_id)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record(self, call: _Call, status: int, head_at: float, meter: ResponseMeter | None = None,
                response: httpx2.Response | None = None, error: str | None = None) -> None:
        usage = meter.finish() if meter else {}  # first: it also reads a JSON body's model and error
        notify(self.callbacks.on_request, RequestRecord(
            self.job_id, call.method, call.path, status, latency=head_at - call.started,
            duration=time.monotonic() - call.started, request_bytes=call.request_bytes,
            response_bytes=meter.bytes if meter else 0, usage=usage,
            rate_limits=rate_limit_headers(response.headers) if response else {},
            model=(meter.model if meter else None) or call.model,
            request_id=response.headers.get("request-id") if response else None, error=error,
            message=meter.error if meter else None))


class _ClientGone(Exception):
    pass


async def _read_body(receive: Callable) -> bytes | None:
    """The whole request body (the model check needs it), or None past MAX_BODY."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------- job registry


@dataclass
class _Job:
    server: asyncio.Server
    state: ServerState  # uvicorn's record of the open connections and their request tasks


class Gateways(JobServers):
    """Every job's gateway, on one ``LoopThread``. Thread-safe; never call it from the loop thread.

    Each gateway is uvicorn's HTTP protocol (h11) on an asyncio server of its own socket, without uvicorn's
    ``Server`` life cycle: that polls for its exit every 0.1 s and pauses 0.1 s more to shut down, which
    every job would pay at its end. Jobs of one upstream share one httpx client: its kept-alive (TLS)
    connections outlive a job; each request carries its own job's credential."""

    kind = "gateway"

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self._clients: dict[str, httpx2.AsyncClient] = {}  # by base URL; used on the loop thread only

    def add_job(self, job_id: str, socket_path: Path, upstream: Upstream,
                callbacks: GatewayCallbacks | None = None, uid: int | None = None, gid: int | None = None) -> None:
        """Serve ``job_id``'s gateway at ``socket_path`` (owned by ``uid``:``gid``); returns once listening."""
        self._serve(job_id, socket_path, uid, gid,
                    lambda sock: self._start(job_id, sock, upstream, callbacks or GatewayCallbacks()))

    def close(self) -> None:
        """Close the shared upstream clients (after every job was removed)."""
        self._loop.call(self._close_clients())

    async def _close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def _client(self, base_url: str) -> httpx2.AsyncClient:
        if base_url not in self._clients:
            # No read timeout: a stream may idle for minutes; the executor's liveness watchdog (fed by
            # on_activity) decides when a job is stalled, not the gateway. No pool limit: each job's
            # streams need their own connections.
            self._clients[base_url] = httpx2.AsyncClient(
                base_url=base_url, follow_redirects=False, limits=httpx2.Limits(max_connections=None),
                timeout=httpx2.Timeout(connect=15.0, read=None, write=60.0, pool=15.0))
        return self._clients[base_url]

    async def _start(self, job_id: str, sock: socket.socket, upstream: Upstream, callbacks: GatewayCallbacks) -> _Job:
        client = self._client(upstream.base_url)
        config = uvicorn.Config(JobApp(job_id, upstream, callbacks, client), http="h11", ws="none",
                                lifespan="off", log_config=None, access_log=False, proxy_headers=False,
                                server_header=False, date_header=False, timeout_keep_alive=30, log_level="warning")
        config.load()
        state = ServerState()
        state.default_headers = list(config.encoded_headers)
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: config.http_protocol_class(config=config, server_state=state, app_state={}), sock=sock)
        return _Job(server, state)

    async def _stop(self, job: _Job) -> None:
        # No new connections; the open ones are closed, so each request in flight sees a disconnect, ends its
        # upstream stream and reports its record before this returns.
        job.server.close()
        for connection in list(job.state.connections):
            connection.transport.close()
        if job.state.tasks:
            await asyncio.wait(list(job.state.tasks), timeout=5.0)
