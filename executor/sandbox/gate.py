"""The limit on a job's open connections to one of its sockets (its API gateway, its egress proxy).

Owns ``Gate``: the accept loop of a job's listening socket, which accepts a connection only while the job
has fewer than ``connections`` open and hands each to the server's own protocol (uvicorn's, asyncio's
stream protocol). The others wait, not accepted, in the kernel's listen backlog (``loop.listen_unix``: 128)
until one closes; past the backlog the kernel refuses the connect at once.

Queueing, not refusing: a burst of a real CLI (parallel subagents, a fresh connection per request through
the forwarder) waits its turn instead of failing, and a waiting connection costs the executor nothing: it
is not accepted, so there is no descriptor, no buffer and no task for it; the kernel bounds the queue (its
backlog, each with at most the client's socket buffer). A job that holds all its connections open only
makes its own next ones wait.

Must never: accept past the limit, or count a connection twice (it is counted when accepted and uncounted
once, when its protocol loses it or when it could not be set up).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class Gate:
    """Accepts on ``sock`` while fewer than ``connections`` are open; ``protocol()`` serves each."""

    def __init__(self, sock: socket.socket, connections: int, protocol: Callable[[], asyncio.Protocol]) -> None:
        self.sock = sock
        self.connections = connections
        self.protocol = protocol
        self.open = 0
        self.accepted = 0  # in all, for the record
        self._room = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> Gate:
        """Start accepting (on the loop's thread)."""
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def close(self) -> None:
        """Stop accepting and close the listening socket; what waits in its backlog is refused by the kernel."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.open >= self.connections:
                self._room.clear()
                await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # out of descriptors, a connection aborted before it was taken: go on
                log.warning("cannot accept a connection: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            self.accepted += 1
            counted = _Counted(self, self.protocol())
            try:
                await loop.connect_accepted_socket(lambda counted=counted: counted, conn)
            except Exception as exc:  # noqa: BLE001 - one connection that cannot be set up: the others go on
                log.warning("cannot serve a connection: %s", exc)
                counted.release()
                conn.close()

    def _closed(self) -> None:
        self.open -= 1
        self._room.set()


class _Counted(asyncio.Protocol):
    """The server's protocol for one accepted connection, giving its place back when the connection ends."""

    def __init__(self, gate: Gate, inner: asyncio.Protocol) -> None:
        self.gate = gate
        self.inner = inner
        self.counted = True

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.gate._closed()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
