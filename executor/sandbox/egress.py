"""Host side of a job's network egress: one HTTP proxy per job, on a Unix socket that is mounted into the
job's container, letting the job reach exactly the hosts and ports of its policy's ``egress`` list.

Owns: deciding each CONNECT or absolute-form HTTP request against the job's rules (``egress_rules.py``),
resolving names itself and connecting to the very address it checked, refusing non-public addresses
unless an entry names that IP literally, relaying the bytes, and reporting every decision (allowed or
denied, with bytes and duration) through a callback. All job proxies share one event loop in one thread
(``loop.LoopThread``); ``EgressProxies.add_job`` / ``remove_job`` may be called from any other thread.

Bounded per job whatever the job sends: at most ``connections`` open connections (``gate.py``: the next ones
wait, not accepted, in the kernel's backlog); a request head of at most ``HEAD_LIMIT`` bytes (h11 refuses a
longer one: 400); per connection at most two stream buffers each way (``CHUNK`` before reading pauses, plus
one socket read of up to 256 KiB, and ``CHUNK`` of writes waiting for the other side: ``drain``). The proxy
parses nothing but HTTP heads (h11) and the request target; it never looks at a body or inside a tunnel.

Must never: resolve a name twice (the address checked is the address used), reach an address the rules
do not allow, parse HTTP by hand (h11 does), look inside a CONNECT tunnel, or block the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import h11

from ..egress_rules import IPAddress, Rule, forbidden_reason, ip_or_none
from .gate import Gate
from .loop import HOP_BY_HOP, JobServers, notify

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
HEAD_LIMIT = 16 * 1024  # a request head longer than this is refused (h11's own default, made explicit)
_SHOWN = 300  # longest host or reason an event repeats (the job chose them)
HEAD_TIMEOUT = 30.0  # a client that has not sent its request head by then is not a real client
CONNECT_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class EgressEvent:
    """One decision of a job's proxy, reported when its connection ends."""

    job_id: str
    allowed: bool
    method: str  # CONNECT, or the plain-HTTP method
    host: str
    port: int
    status: int  # what the proxy answered: 200 tunnel / upstream status, 403 denied, 400, 502
    reason: str
    address: str | None = None  # the IP connected to
    bytes_up: int = 0  # container -> destination
    bytes_down: int = 0  # destination -> container
    duration: float = 0.0


@dataclass(frozen=True)
class EgressCallbacks:
    """Called on the proxies' loop thread: must be quick and thread-safe (e.g. put on a queue)."""

    on_decision: Callable[[EgressEvent], None] | None = None


class _Refused(Exception):
    """The proxy answers this request itself. ``allowed``: the rules allowed it, but it could not be done."""

    def __init__(self, status: int, reason: str, allowed: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.allowed = allowed


# -------------------------------------------------------------------------------------- one request


@dataclass
class _Exchange:
    """The state of one proxied connection, filled in as it goes."""

    method: str = "-"
    host: str = ""
    port: int = 0
    address: str | None = None
    status: int = 0
    reason: str = ""
    allowed: bool = False
    counts: list[int] = field(default_factory=lambda: [0, 0])  # bytes up, down
    started: float = field(default_factory=time.monotonic)


class JobProxy:
    """The egress proxy of one job: answers each connection on its socket."""

    def __init__(self, job_id: str, rules: list[Rule], callbacks: EgressCallbacks) -> None:
        self.job_id = job_id
        self.rules = rules
        self.callbacks = callbacks
        self.tasks: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        ex = _Exchange()
        try:
            request = await asyncio.wait_for(_next_event(conn, reader), HEAD_TIMEOUT)
            if isinstance(request, h11.Request):
                await self._serve(conn, reader, writer, request, ex)
        except _Refused as refused:
            ex.status, ex.reason, ex.allowed = refused.status, refused.reason, refused.allowed
            _answer_plain(writer, conn, refused.status, refused.reason)
        except (h11.ProtocolError, TimeoutError) as exc:
            ex.status, ex.reason = 400, f"bad request: {str(exc) or type(exc).__name__}"
            _answer_plain(writer, conn, 400, "bad request")
        except OSError as exc:
            ex.reason = ex.reason or f"connection failed: {exc}"
        finally:
            writer.close()  # flushes a refusal's answer first
            self.tasks.discard(task)
            if ex.method != "-" or ex.status:  # a connection that sent nothing decided nothing
                notify(self.callbacks.on_decision, EgressEvent(
                    self.job_id, ex.allowed, ex.method[:_SHOWN], ex.host[:_SHOWN], ex.port, ex.status,
                    ex.reason[:2 * _SHOWN], ex.address, ex.counts[0], ex.counts[1], time.monotonic() - ex.started))

    async def _serve(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: h11.Request, ex: _Exchange) -> None:
        ex.method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        if ex.method == "CONNECT":
            ex.host, ex.port = _connect_target(target)
        else:
            ex.host, ex.port, path = _absolute_target(target)
        rule, addresses = await self._decide(ex.host, ex.port)
        up_reader, up_writer = await _open_first(addresses, ex.port, ex)
        ex.allowed, ex.reason = True, f"allowed by {rule}"
        try:
            if ex.method == "CONNECT":
                await self._tunnel(conn, reader, writer, up_reader, up_writer, ex)
            else:
                await _forward_http(conn, request, path, reader, writer, up_reader, up_writer, ex)
        finally:
            up_writer.close()

    def _rule_for(self, host: str, port: int) -> Rule | None:
        ip = ip_or_none(host)
        return next((rule for rule in self.rules if rule.matches(host, port, ip)), None)

    async def _decide(self, host: str, port: int) -> tuple[Rule, list[IPAddress]]:
        """The rule allowing this request and the addresses it may connect to, or _Refused saying why not."""
        rule = self._rule_for(host, port)
        if rule is None:
            raise _Refused(403, f"{_hostport(host, port)} is not in this job's egress list")
        if rule.ip is not None:
            return rule, [rule.ip]  # named literally: allowed whatever kind of address it is
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Refused(502, f"cannot resolve {host}: {exc.strerror}", allowed=True) from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        allowed = [ip for ip in addresses if forbidden_reason(ip) is None]
        if not allowed:
            ip = addresses[0]
            raise _Refused(403, f"{host} resolves to {ip}, {forbidden_reason(ip)}, which the sandbox may not "
                                f"reach unless the egress list names {ip} itself")
        return rule, allowed

    @staticmethod
    async def _tunnel(conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, ex: _Exchange) -> None:
        writer.write(conn.send(h11.Response(status_code=200, reason=b"Connection Established", headers=[])))
        ex.status = 200
        early, _ = conn.trailing_data  # bytes the client sent right after its CONNECT (e.g. a TLS hello)
        if early:
            up_writer.write(early)
            ex.counts[0] += len(early)
        await asyncio.gather(_pipe(reader, up_writer, ex.counts, 0), _pipe(up_reader, writer, ex.counts, 1))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_target(target: str) -> tuple[str, int]:
    return _host_port_of(urlsplit("//" + target), target, default_port=None)


def _absolute_target(target: str) -> tuple[str, int, str]:
    url = urlsplit(target)
    if url.scheme != "http":
        raise _Refused(400, "only absolute http:// requests and CONNECT are proxied (use CONNECT for https)")
    host, port = _host_port_of(url, target, default_port=80)
    return host, port, (url.path or "/") + (f"?{url.query}" if url.query else "")


def _host_port_of(url: SplitResult, target: str, default_port: int | None) -> tuple[str, int]:
    try:
        port = url.port or default_port
    except ValueError:
        port = None
    if not url.hostname or port is None:
        raise _Refused(400, f"bad proxy target {target!r}: expected host:port")
    return url.hostname.rstrip("."), port


async def _open_first(addresses: list[IPAddress], port: int, ex: _Exchange
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the first address that answers (these exact addresses: no second lookup)."""
    errors = []
    for ip in addresses:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(str(ip), port, limit=CHUNK),
                                                    CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            errors.append(f"{ip}: {str(exc) or 'timed out'}")
            continue
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ex.address = str(ip)
        return reader, writer
    raise _Refused(502, f"cannot connect to {_hostport(ex.host, port)}: {'; '.join(errors)}", allowed=True)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, counts: list[int] | None = None,
                      index: int = 0) -> object:
    """The next h11 event of ``conn``, reading from ``reader`` as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await reader.read(CHUNK)
        if counts is not None:
            counts[index] += len(data)
        conn.receive_data(data)  # b"" tells h11 the peer closed


async def _forward_http(conn: h11.Connection, request: h11.Request, path: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                        up_writer: asyncio.StreamWriter, ex: _Exchange) -> None:
    """One absolute-form request, re-sent in origin form on a fresh connection; then both are closed."""
    upstream = h11.Connection(h11.CLIENT)
    if conn.they_are_waiting_for_100_continue:
        # Answered here, so that the destination never sees "Expect" (dropped below) and never pauses.
        writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    headers = [(k, v) for k, v in request.headers if k.decode("latin-1") not in HOP_BY_HOP | {"host", "expect"}]
    headers = [(b"host", _hostport(ex.host, ex.port).encode())] + headers + [(b"connection", b"close")]
    out = upstream.send(h11.Request(method=request.method, target=path.encode(), headers=headers))
    while True:  # the request body, as it arrives
        up_writer.write(out)
        ex.counts[0] += len(out)
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            out = upstream.send(h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage):
            up_writer.write(upstream.send(h11.EndOfMessage()))
            break
        else:
            raise _Refused(400, "client closed before its request body ended")
    await up_writer.drain()
    while True:  # the response, as it arrives
        event = await _next_event(upstream, up_reader, ex.counts, 1)
        if isinstance(event, h11.Response):
            ex.status = event.status_code
            kept = [(k, v) for k, v in event.headers if k.decode("latin-1") not in HOP_BY_HOP]
            writer.write(conn.send(h11.Response(status_code=event.status_code, reason=event.reason,
                                                headers=kept + [(b"connection", b"close")])))
        elif isinstance(event, h11.Data):
            writer.write(conn.send(h11.Data(data=event.data)))
            await writer.drain()
        elif isinstance(event, h11.EndOfMessage):
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise OSError("destination closed the connection mid-response")
        # an InformationalResponse (e.g. 102 Processing) is not passed on: the final answer follows


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: list[int], index: int) -> None:
    """Copy until EOF, then half-close the other side; count the bytes."""
    try:
        while data := await reader.read(CHUNK):
            counts[index] += len(data)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


def _answer_plain(writer: asyncio.StreamWriter, conn: h11.Connection, status: int, reason: str) -> None:
    """A short plain-text answer, if the connection can still take one."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or writer.is_closing():
        return
    body = (reason + "\n").encode()
    phrase = {400: b"Bad Request", 403: b"Forbidden", 502: b"Bad Gateway"}.get(status, b"Error")
    try:
        writer.write(conn.send(h11.Response(status_code=status, reason=phrase, headers=[
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")])))
        writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    except h11.LocalProtocolError:
        pass  # the response had already started; closing the connection is the only signal left


# ------------------------------------------------------------------------------------- job registry


@dataclass
class _Job:
    proxy: JobProxy
    gate: Gate


class EgressProxies(JobServers):
    """Every job's egress proxy, on one ``LoopThread``. Thread-safe; never call it from the loop thread."""

    kind = "egress proxy"

    def add_job(self, job_id: str, socket_path: Path, rules: list[Rule], callbacks: EgressCallbacks | None = None,
                uid: int | None = None, gid: int | None = None, connections: int = 8) -> None:
        """Serve ``job_id``'s proxy at ``socket_path`` (owned by ``uid``:``gid``), at most ``connections`` open at
        once; returns once listening."""
        proxy = JobProxy(job_id, list(rules), callbacks or EgressCallbacks())
        self._serve(job_id, socket_path, uid, gid, lambda sock: self._start(proxy, sock, connections))

    @staticmethod
    async def _start(proxy: JobProxy, sock: socket.socket, connections: int) -> _Job:
        loop = asyncio.get_running_loop()

        def stream() -> asyncio.Protocol:  # what asyncio.start_unix_server makes for each connection
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=CHUNK, loop=loop), proxy.handle, loop=loop)

        return _Job(proxy, Gate(sock, connections, stream).start())

    async def _stop(self, job: _Job) -> None:
        await job.gate.close()
        tasks = list(job.proxy.tasks)
        for task in tasks:
            task.cancel()
        # Each handler reports its connection's event in its finally block, also when cancelled.
        await asyncio.gather(*tasks, return_exceptions=True)
