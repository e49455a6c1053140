"""Host side of a job's model API access: one HTTP gateway per job, on a Unix socket that is mounted into
the job's container, forwarding the CLI's API calls to the runner's upstream with the real credential.

Owns: which API routes a job may call, swapping the container's placeholder credential for the real one
on every request, refusing any model but the runner's (asked for, or answering where the agent's stream
never names it), streaming responses back unbuffered, and the per-request accounting (status, latency,
bytes, usage, rate-limit headers) and liveness signal that it reports through callbacks. What differs
between model APIs (routes, credential headers, where the model is named, how usage and errors read, which
answers are weather) is the upstream's ``ApiProtocol`` (``api.py``), which each agent's package implements. All job gateways share one event loop in one thread (``loop.LoopThread``);
``Gateways.add_job`` / ``remove_job`` may be called from any other thread.

What a job can make it hold is bounded per job, whatever the job sends: at most ``Limits.connections`` open
connections (``gate.py``: the next ones wait, not accepted, in the kernel's backlog); per connection at
most ``bodies.IN_MEMORY`` bytes of a body in memory (the rest goes to an unnamed file in the job's own
directory, on the job's disk), uvicorn's read buffer (64 KiB, plus one socket read of up to 256 KiB before it
pauses), the answer's relay buffer (64 KiB plus one upstream chunk) and what ``usage.ResponseMeter`` keeps of
it (at most 64 KiB, or 1 MiB of a JSON answer). A body is parsed once, strictly
(``strict_json``): on the loop when it is small, else by the one ``bodies.ParsePool`` thread that serves the
jobs in turn, and only if its estimated parse fits ``Limits.parse_memory``; what is forwarded is the very
bytes that were checked. So the executor holds at most, per job, ``connections x (IN_MEMORY + 320 KiB +
128 KiB + httpx's own buffers)`` (measured: ``bench/gateway.py`` "hostile"; README, Sealed sandbox), and for
all jobs together one parse of at most ``parse_memory``.

Must never: let the real credential reach the container (not in a header, a body or an error message),
hold back a streamed response, retry a request itself (the CLI and the executor own retries), parse
HTTP by hand (uvicorn and httpx do), forward a body other than the one it checked, or block the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import uvicorn
from uvicorn.server import ServerState

from . import strict_json
from .bodies import Body, ClientGone, ParsePool, Spool, check_head, read_body, until_hangup, wait_disconnect
from .gate import Gate
from .api import ApiProtocol, Route
from .gateway_types import AuthType, GatewayCallbacks, Limits, Refusal, RequestRecord, Upstream
from .loop import HOP_BY_HOP, JobServers, LoopThread, notify
from .strict_json import BodyRefused
from .usage import ResponseMeter

log = logging.getLogger(__name__)
__all__ = ["ApiProtocol", "AuthType", "GatewayCallbacks", "Gateways", "Limits", "Refusal", "RequestRecord",
           "Upstream"]

# The only calls a job may make are its protocol's routes (``ApiProtocol.route``): the agent's own commands
# can reach the gateway too, and the routes and the model check are what keep them to the runner's model.

#: A refused model is answered 400 (an invalid request in every API's words). The CLIs do not back off on it:
#: they end the run quoting our message. 403 reads as an authentication failure to them, which the
#: executor's stream classifiers would take for a bad credential.
MODEL_MISMATCH_STATUS = 400
#: A body with fewer containers than this is parsed on the loop itself (a few ms at most, the CLI's usual).
INLINE_CONTAINERS = 2048
#: Longest path, reason or model name a refusal repeats (the job chose them).
_SHOWN = 300

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded; host is httpx's,
# content-length the size of the body that was read and checked; the protocol's credential headers are the
# placeholder's.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
_RESPONSE_DROP = HOP_BY_HOP


# -------------------------------------------------------------------------------------------- the app


@dataclass
class _Call:
    """One request as it is being handled."""

    method: str
    path: str  # with the query string, as the job sent it
    upstream_path: str = ""  # what goes upstream (the protocol may drop a query parameter)
    started: float = field(default_factory=time.monotonic)
    request_bytes: int = 0
    model: str | None = None  # the model the request asked for


class JobApp:
    """The ASGI app of one job's gateway."""

    def __init__(self, job_id: str, upstream: Upstream, callbacks: GatewayCallbacks, client: httpx2.AsyncClient,
                 bodies: _Bodies, limits: Limits) -> None:
        self.job_id = job_id
        self.upstream = upstream
        self.callbacks = callbacks
        self.client = client
        self.bodies = bodies
        self.limits = limits
        self.api: ApiProtocol = upstream.api
        self.drop = _REQUEST_DROP | self.api.credential_headers

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served; nothing else arrives
        method, route = scope["method"], scope["path"]
        query = scope["query_string"].decode("latin-1")
        call = _Call(method, route + (f"?{query}" if query else ""), self.api.forward_path(route, query))
        allowed = self.api.route(method, route)
        if allowed is None:
            await self._refuse(send, call, "route", 403, "permission_error",
                               f"{method} {route[:_SHOWN]} is not an API route this sandbox may call")
            return
        body = None
        try:
            check_head(scope)
            body = await read_body(receive, self.bodies.spool, self.bodies.io)
            call.request_bytes = body.size
            shape = await until_hangup(self._parse(body), receive)
            if not await self._model_ok(send, call, shape, allowed):
                return
            await self._forward(scope, receive, send, call, body)
        except BodyRefused as refused:
            await self._refuse(send, call, "body", refused.status, refused.type_, refused.message)
        except ClientGone:
            return  # hung up before its answer: nobody is left to answer
        finally:
            if body is not None:
                body.close()

    async def _parse(self, body: Body) -> tuple[bool, Any]:
        """The body's one strict parse, here when it is small, else in the parse pool in this job's turn:
        whether it is an object, and its model (nothing else of it is kept)."""
        if body.data is not None and strict_json.small(body.data, INLINE_CONTAINERS):
            return _shape(strict_json.parse(body.data, self.limits.parse_memory))
        return await self.bodies.parser.run(self.job_id, lambda: _shape(body.parse(self.limits.parse_memory)))

    async def _model_ok(self, send: Callable, call: _Call, shape: tuple[bool, Any], route: Route) -> bool:
        is_object, requested = shape
        if not is_object:
            await self._refuse(send, call, "body", 400, "invalid_request_error", "request body is not a JSON object")
            return False
        if route.model_in == "none":
            return True
        if route.model_in == "path":
            requested = route.path_model
        call.model = requested[:_SHOWN] if isinstance(requested, str) else None
        if requested == self.upstream.model:
            return True
        shown = str(requested)[:_SHOWN]
        await self._refuse(send, call, "model", MODEL_MISMATCH_STATUS, "invalid_request_error",
                           f"model {shown!r} is not allowed in this sandbox: the job's runner uses "
                           f"{self.upstream.model!r} only", requested=shown)
        return False

    async def _refuse(self, send: Callable, call: _Call, kind: str, status: int, type_: str, message: str,
                      requested: str | None = None) -> None:
        # Reported before the answer leaves: the executor knows why before the CLI can react to it.
        notify(self.callbacks.on_refusal, Refusal(
            self.job_id, kind, call.method, call.path[:_SHOWN], status, message[:2 * _SHOWN],
            requested_model=requested, expected_model=self.upstream.model if kind == "model" else None))
        status, headers, body = self.api.error(status, type_, message)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _upstream_headers(self, scope: dict) -> list[tuple[str, str]]:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in self.drop]
        # identity: usage is read from the body as it passes; the API does not compress SSE anyway
        headers.append(("accept-encoding", "identity"))
        headers.extend(self.upstream.auth_headers().items())
        return headers

    async def _forward(self, scope: dict, receive: Callable, send: Callable, call: _Call, body: Body) -> None:
        headers = self._upstream_headers(scope) + [("content-length", str(body.size))]
        request = self.client.build_request(call.method, call.upstream_path, headers=headers,
                                            content=body.chunks(self.bodies.io))
        try:
            response = await until_hangup(self.client.send(request, stream=True), receive)
        except httpx2.HTTPError as exc:
            # The CLI retries a 502 like any 5xx: an unreachable upstream is worth another try.
            status, headers, payload = self.api.error(502, "api_error", f"gateway: upstream unreachable "
                                                                        f"({type(exc).__name__})", retry=True)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            self._record(call, status, time.monotonic(), error=f"upstream: {type(exc).__name__}: {exc}")
            return
        head_at = time.monotonic()
        meter = self.api.meter(response.headers.get("content-type", ""))
        error = None
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                    for k, v in response.headers.multi_items() if k not in _RESPONSE_DROP]})
            error = await self._relay(response, receive, send, meter, call)
        finally:
            await response.aclose()
            self._record(call, response.status_code, head_at, meter, response, error)

    async def _relay(self, response: httpx2.Response, receive: Callable, send: Callable,
                     meter: ResponseMeter, call: _Call) -> str | None:
        """Pass the body on chunk by chunk until it ends or the container hangs up; why it was cut short."""
        pump = asyncio.ensure_future(self._pump(response, send, meter, call))
        # A hang-up is only seen by receive(): without this, a stalled upstream stream would be kept
        # open for a client that is long gone (uvicorn's send() ignores a closed connection).
        hangup = asyncio.ensure_future(wait_disconnect(receive))
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
        if isinstance(exc, _OtherModel):
            return str(exc)
        raise exc

    async def _pump(self, response: httpx2.Response, send: Callable, meter: ResponseMeter, call: _Call) -> None:
        async for chunk in response.aiter_raw():
            meter.feed(chunk)
            notify(self.callbacks.on_activity, self.job_id)
            if self.api.checks_answers and meter.model is not None and meter.model != self.upstream.model:
                self._answered_by(call, meter.model)  # cut before this chunk: the rest never reaches the agent
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _answered_by(self, call: _Call, model: str) -> None:
        """An answer named another model than the runner's: reported at once (the job's stop check reads it)
        and cut (the connection closes without the answer's end)."""
        shown = model[:_SHOWN]
        notify(self.callbacks.on_refusal, Refusal(
            self.job_id, "answer", call.method, call.path[:_SHOWN], 502,
            f"the answer came from {shown!r}, not the runner's {self.upstream.model!r}: cut before it reached "
            "the agent", requested_model=shown, expected_model=self.upstream.model))
        raise _OtherModel(f"answer from {shown!r} cut: the runner's model is {self.upstream.model!r}")

    def _record(self, call: _Call, status: int, head_at: float, meter: ResponseMeter | None = None,
                response: httpx2.Response | None = None, error: str | None = None) -> None:
        usage = meter.finish() if meter else {}  # first: it also reads a JSON body's model and error
        notify(self.callbacks.on_request, RequestRecord(
            self.job_id, call.method, call.path, status, latency=head_at - call.started,
            duration=time.monotonic() - call.started, request_bytes=call.request_bytes,
            response_bytes=meter.bytes if meter else 0, usage=usage,
            rate_limits=self.api.rate_limit_headers(response.headers) if response else {},
            model=(meter.model if meter else None) or call.model,
            request_id=self.api.request_id(response.headers) if response else None, error=error,
            message=meter.error if meter else None, weather=self.api.weather(status, meter),
            reading=self.api.reading(response.headers, meter) if response else self.api.reading({})))


class _OtherModel(Exception):
    """An answer named another model than the runner's (a protocol that checks answers)."""


def _shape(value: Any) -> tuple[bool, Any]:
    return (True, value.get("model")) if isinstance(value, dict) else (False, None)


# ------------------------------------------------------------------------------------- job registry


@dataclass
class _Bodies:
    """Where a job's request bodies go: its spool directory, the I/O pool and the parse pool every job shares."""

    spool: Spool
    io: ThreadPoolExecutor
    parser: ParsePool


@dataclass
class _Job:
    gate: Gate
    state: ServerState  # uvicorn's record of the open connections and their request tasks
    spool: Spool


class Gateways(JobServers):
    """Every job's gateway, on one ``LoopThread``. Thread-safe; never call it from the loop thread.

    Each gateway is uvicorn's HTTP protocol (h11) on an asyncio server of its own socket, without uvicorn's
    ``Server`` life cycle: that polls for its exit every 0.1 s and pauses 0.1 s more to shut down, which
    every job would pay at its end. Jobs of one upstream share one httpx client: its kept-alive (TLS)
    connections outlive a job; each request carries its own job's credential. Every job's spool writes share
    one small I/O pool, and its large bodies one parse thread (``ParsePool``, started by ``start``)."""

    kind = "gateway"

    def __init__(self, loop: LoopThread) -> None:
        super().__init__(loop)
        self._clients: dict[str, httpx2.AsyncClient] = {}  # by base URL; used on the loop thread only
        self.parser = ParsePool("sandbox-parse")
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandbox-spool")

    def start(self) -> Gateways:
        self.parser.start()
        return self

    def add_job(self, job_id: str, socket_path: Path, upstream: Upstream, callbacks: GatewayCallbacks | None = None,
                uid: int | None = None, gid: int | None = None, spool: Path | None = None,
                limits: Limits | None = None) -> None:
        """Serve ``job_id``'s gateway at ``socket_path`` (owned by ``uid``:``gid``); returns once listening.
        ``spool``: the root-owned directory its large bodies go to (default: ``bodies`` beside the socket's
        directory, in the job's directory)."""
        directory = Path(spool) if spool is not None else Path(socket_path).parent.parent / "bodies"
        self._serve(job_id, socket_path, uid, gid, lambda sock: self._start(
            job_id, sock, upstream, callbacks or GatewayCallbacks(), directory, limits or Limits()))

    def close(self) -> None:
        """Close the shared upstream clients and pools (after every job was removed)."""
        self._loop.call(self._close_clients())
        self.parser.stop()
        self.io.shutdown(wait=False)

    async def _close_clients(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    def _client(self, base_url: str) -> httpx2.AsyncClient:
        if base_url not in self._clients:
            # No read timeout: a stream may idle for minutes; the executor's liveness watchdog (fed by
            # on_activity) decides when a job is stalled, not the gateway. No pool limit: each job's
            # streams need their own connections (each job has at most Limits.connections).
            self._clients[base_url] = httpx2.AsyncClient(
                base_url=base_url, follow_redirects=False, limits=httpx2.Limits(max_connections=None),
                timeout=httpx2.Timeout(connect=15.0, read=None, write=60.0, pool=15.0))
        return self._clients[base_url]

    async def _start(self, job_id: str, sock: socket.socket, upstream: Upstream, callbacks: GatewayCallbacks,
                     directory: Path, limits: Limits) -> _Job:
        spool = Spool(directory)
        try:
            app = JobApp(job_id, upstream, callbacks, self._client(upstream.url),
                         _Bodies(spool, self.io, self.parser), limits)
            config = uvicorn.Config(app, http="h11", ws="none", lifespan="off", log_config=None, access_log=False,
                                    proxy_headers=False, server_header=False, date_header=False,
                                    timeout_keep_alive=30, log_level="warning")
            config.load()
            state = ServerState()
            state.default_headers = list(config.encoded_headers)
            protocol = partial(config.http_protocol_class, config=config, server_state=state, app_state={})
            gate = Gate(sock, limits.connections, protocol).start()
        except BaseException:
            spool.close()
            raise
        return _Job(gate, state, spool)

    async def _stop(self, job: _Job) -> None:
        # No new connections; the open ones are closed, so each request in flight sees a disconnect, ends its
        # upstream stream and reports its record before this returns; one that does not is cancelled.
        await job.gate.close()
        for connection in list(job.state.connections):
            connection.transport.close()
        if job.state.tasks:
            _, late = await asyncio.wait(list(job.state.tasks), timeout=5.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5.0)
        job.spool.close()
