"""Test support for the sealed sandbox's host side: a started ``Sealer`` whose jobs record what their gateway
and egress proxy report, an HTTP client over a Unix socket, a plain origin server and a pings-only upstream
on 127.0.0.1.

Every server here listens on 127.0.0.1 only; every job directory is removed by ``HostSide.close``.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import itertools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from executor.agent.claude_code.api import MESSAGES
from executor.egress_rules import parse_egress
from executor.sandbox.egress import EgressEvent
from executor.sandbox.gateway import Refusal, RequestRecord, Upstream
from executor.sandbox.journal import Batch, Entry
from executor.sandbox.seal import Hooks, Sealed, Sealer, SealLimits

MODEL = "claude-sonnet-4-5"
REAL_KEY = "sk-ant-api03-REAL-test-credential"
UID = GID = 1000


def messages_body(model: str = MODEL, stream: bool = False, prompt: str = "hello") -> str:
    return json.dumps({"model": model, "max_tokens": 64, "stream": stream, "tools": [{"name": "t"}],
                       "messages": [{"role": "user", "content": prompt}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: one connection object = one kept-alive connection."""

    def __init__(self, path: Path, timeout: float = 10) -> None:
        super().__init__("sandbox", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        if len(os.fsencode(self.socket_path)) <= 107:
            self.sock.connect(self.socket_path)
        else:  # too long for a socket address (a container never sees such a path: there it is /run/executor/...)
            directory = os.open(os.path.dirname(self.socket_path), os.O_PATH | os.O_DIRECTORY)
            try:
                self.sock.connect(f"/proc/self/fd/{directory}/{os.path.basename(self.socket_path)}")
            finally:
                os.close(directory)
        if self._tunnel_host:
            self._tunnel()  # CONNECT through the job's egress proxy


def post(socket_path: Path, body: str | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    """One Messages request on a fresh connection to a job's gateway socket: the response and its body."""
    conn = UnixHTTPConnection(socket_path)
    try:
        conn.request("POST", "/v1/messages", body or messages_body())
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


_ids = itertools.count(1)


@dataclass
class Job:
    """One job's host side as a test sees it: its socket directory and everything reported, as the journal
    handed it over (``refusals`` and ``egress``: the first report of each aggregate; ``events``: each
    aggregate as last written, by its id; ``batches``: the batches written, in order)."""

    job_id: str
    directory: Path
    sealed: Sealed | None = None
    records: list[RequestRecord] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    egress: list[EgressEvent] = field(default_factory=list)
    activity: list[float] = field(default_factory=list)
    events: dict[int, Entry] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)

    def write(self, batch: Batch) -> list[int]:
        """The test's store: keeps what it is given; an event's id is its place in a global sequence."""
        self.batches.append(batch)
        self.records.extend(batch.requests)
        ids = []
        for entry in batch.entries:
            if entry.event_id is None:
                event_id = next(_ids)
                ids.append(event_id)
                if entry.kind == "gateway_refused":
                    self.refusals.append(entry.first)
                elif entry.kind == "egress":
                    self.egress.append(entry.first)
            self.events[entry.event_id or event_id] = entry
        return ids

    def counts(self, kind: str) -> list[int]:
        """The counts of this job's aggregates of ``kind``, as last written."""
        return [entry.count for entry in self.events.values() if entry.kind == kind]

    @property
    def api_socket(self) -> Path:
        return self.directory / "api.sock"

    @property
    def egress_socket(self) -> Path:
        return self.directory / "egress.sock"


class HostSide:
    """A started sealer; ``add_job`` serves a job's sockets in a fresh directory, ``close`` removes all."""

    def __init__(self) -> None:
        self.sealer = Sealer().start()
        self.root = Path(tempfile.mkdtemp(prefix="seal-"))
        self.jobs: list[Job] = []

    def add_job(self, job_id: str, upstream: Upstream, egress: list[str] = (), uid: int = UID,
                limits: SealLimits | None = None, write=None) -> Job:
        """``write``: the job's batch writer instead of ``Job.write`` (it must call ``Job.write`` to keep the
        job's view)."""
        job = Job(job_id, self.root / job_id / "sock")
        job.directory.parent.mkdir(parents=True)
        hooks = Hooks(write=write or job.write, activity=lambda: job.activity.append(time.monotonic()))
        job.sealed = self.sealer.open(job_id, job.directory, upstream, parse_egress(egress), uid, uid, hooks,
                                      limits)
        self.jobs.append(job)
        return job

    def remove_job(self, job: Job) -> None:
        self.sealer.close(job.job_id)

    def close(self) -> None:
        for job in self.jobs:
            self.sealer.close(job.job_id)
        self.sealer.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def upstream(base_url: str, auth_type: str = "api_key") -> Upstream:
    return Upstream(MODEL, REAL_KEY, auth_type, base_url, protocol=MESSAGES)


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass


class _Server:
    def __init__(self, handler: type) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Origin(_Server):
    """A plain HTTP server standing in for a destination a job's egress list allows."""

    def __init__(self) -> None:
        class Handler(_Quiet):
            def do_GET(self) -> None:
                self.answer(f"origin saw {self.path}".encode())

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["content-length"]))
                self.answer(f"origin got {len(data)} bytes at {self.path} for {self.headers['host']}".encode())

            def answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


class PingsOnly(_Server):
    """An upstream answering every request with message_start and then only pings until the client goes away
    (what a slow model looks like on the wire)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.client_gone = threading.Event()
        outer = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                start = {"type": "message_start", "message": {"model": MODEL,
                                                              "usage": {"input_tokens": 7, "output_tokens": 1}}}
                try:
                    self.chunk(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
                    while True:
                        time.sleep(interval)
                        self.chunk(b'event: ping\ndata: {"type": "ping"}\n\n')
                except OSError:
                    outer.client_gone.set()

            def chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        super().__init__(Handler)


class Sink(_Server):
    """An upstream that reads each request body in small pieces, keeps only its size and SHA-256, and answers
    a small Messages reply: what the gateway forwarded, without holding it in this process's memory."""

    def __init__(self) -> None:
        self.bodies: list[tuple[int, str]] = []
        outer = self

        class Handler(_Quiet):
            def do_POST(self) -> None:
                left, digest = int(self.headers.get("content-length") or 0), hashlib.sha256()
                size = left
                while left:
                    piece = self.rfile.read(min(left, 65536))
                    if not piece:
                        return
                    digest.update(piece)
                    left -= len(piece)
                outer.bodies.append((size, digest.hexdigest()))
                body = json.dumps({"id": "msg_sink", "type": "message", "role": "assistant", "model": MODEL,
                                   "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                   "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
