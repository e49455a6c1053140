"""The threads and sockets of the sealed sandbox's host side: one asyncio event loop in one thread, shared by
every job's API gateway and egress proxy; one recorder thread that takes their blocking work (the store)
off that loop; and the Unix sockets they listen on.

Owns: the loop thread's and the recorder's lifecycle, running a coroutine on the loop from any other
thread and waiting for its result, the recorder's per-job lanes (each job's journal, written a batch at a
time, the jobs in turn; a job's close writes its own rest in the closing thread), making a job's listening
Unix socket (path checks, owner, mode) before anything can connect, and calling the executor's callbacks so
that a faulty callback cannot take a job's server down.

Must never: block the loop (everything here that can block runs in the caller's thread or the recorder's),
know about HTTP, make a job's close wait for another job's records, or remove a file at a socket path that
is not a socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .journal import Batch, JobJournal

log = logging.getLogger(__name__)

T = TypeVar("T")

# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107
#: Headers of one connection, never forwarded by a proxy (RFC 9110 7.6.1, with the proxy-era names).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "proxy-connection"})
SOCKET_MODE = 0o600


class LoopThread:
    """An event loop running in a daemon thread; other threads hand it coroutines with ``call``."""

    def __init__(self, name: str = "sandbox-io") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None  # made by start()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> LoopThread:
        self.loop = asyncio.new_event_loop()
        self.thread.start()
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        if threading.current_thread() is self.thread:
            coro.close()
            # Waiting on the loop's own thread for the loop would deadlock: fail loudly instead.
            raise RuntimeError(f"{self.name}: call() from the loop thread itself; await the coroutine")
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError(f"{self.name}: the event loop thread is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.name}: no result within {timeout} s") from None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and close it. Servers still on it are abandoned: remove jobs first."""
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class _Lane:
    """One job's place at the recorder: its journal, how to write a batch, and the lock held while one is
    written (the job's close waits on it, and on nothing else)."""

    journal: JobJournal
    write: Callable[[Batch], list[int]]
    writing: threading.Lock = field(default_factory=threading.Lock)
    queued: bool = False  # in the recorder's turns (guarded by the recorder's condition)


class Recorder:
    """One thread writing what every job's sandbox reported: a batch of one job (one transaction) at a time,
    the jobs in turn, so a job that reports a lot writes no faster than the others and none waits behind it.
    ``close(job)`` writes what is left of that job in the caller's thread: it waits for that job's batch in
    flight, never for another job's. A batch that fails is logged; the thread goes on."""

    def __init__(self, name: str = "sandbox-recorder", batch: int = 500) -> None:
        self.batch = batch
        self._lanes: dict[str, _Lane] = {}
        self._turns: deque[str] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Recorder:
        self.thread.start()
        return self

    def open(self, job_id: str, journal: JobJournal, write: Callable[[Batch], list[int]]) -> None:
        """Serve ``journal`` (which must call ``ready(job_id)`` when it gets something to write)."""
        with self._ready:
            self._lanes[job_id] = _Lane(journal, write)

    def ready(self, job_id: str) -> None:
        """``job_id``'s journal has something to write; never blocks (safe on the loop thread)."""
        with self._ready:
            lane = self._lanes.get(job_id)
            if lane is not None and not lane.queued:
                lane.queued = True
                self._turns.append(job_id)
                self._ready.notify()

    def pending(self, job_id: str) -> int:
        """How many of ``job_id``'s reports wait to be written (0 for a closed job)."""
        with self._ready:
            lane = self._lanes.get(job_id)
        return lane.journal.pending() if lane is not None else 0

    def close(self, job_id: str) -> None:
        """Write what is left of ``job_id``'s reports, here, and forget the job. Waits for the batch of this job
        the recorder may be writing, not for any other job's. Unknown jobs are fine."""
        with self._ready:
            lane = self._lanes.pop(job_id, None)
        if lane is None:
            return
        with lane.writing:
            while (batch := lane.journal.take(self.batch)) is not None:
                self._write(lane, batch)

    def stop(self, timeout: float = 10.0) -> None:
        """Write what every open job has left, then end the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        for job_id in list(self._lanes):
            self.close(job_id)

    def _next(self) -> _Lane | None:
        with self._ready:
            while not self._turns and not self._stopping:
                self._ready.wait()
            if not self._turns:
                return None
            job_id = self._turns.popleft()
            lane = self._lanes.get(job_id)
            if lane is not None:
                lane.queued = False
            return lane

    def _run(self) -> None:
        while not self._stopping or self._turns:
            lane = self._next()
            if lane is None:
                continue
            with lane.writing:
                batch = lane.journal.take(self.batch)
                if batch is not None:
                    self._write(lane, batch)
            if lane.journal.pending():
                self.ready(lane.journal.job_id)  # the rest after every other job's next batch

    def _write(self, lane: _Lane, batch: Batch) -> None:
        try:
            lane.journal.written(batch, lane.write(batch))
        except Exception:  # one batch that cannot be written must not stop the recording of the others
            log.exception("recording failed", extra={"action": "recorder", "job": batch.job_id})


class JobServers:
    """One server per job, each on its own Unix socket, all on one ``LoopThread``: the bookkeeping the API
    gateways and the egress proxies share. Thread-safe; never call it from the loop thread. A subclass says
    how a job's server starts (a coroutine given the listening socket) and how it stops (``_stop``)."""

    kind = "server"

    def __init__(self, loop: LoopThread) -> None:
        self._loop = loop
        self._jobs: dict[str, tuple[Any, Path] | None] = {}
        self._lock = threading.Lock()

    def _serve(self, job_id: str, socket_path: Path, uid: int | None, gid: int | None,
               start: Callable[[socket.socket], Coroutine[Any, Any, Any]]) -> None:
        """Listen at ``socket_path`` (owned by ``uid``:``gid``) and start the job's server; returns once it
        serves. On failure nothing of it remains."""
        with self._lock:
            if job_id in self._jobs:
                raise ValueError(f"job {job_id} already has a {self.kind}")
            self._jobs[job_id] = None  # reserved: a concurrent start for the same id fails above
        try:
            sock = listen_unix(socket_path, uid, gid)
            try:
                served = self._loop.call(start(sock))
            except BaseException:
                sock.close()
                remove_socket(socket_path)
                raise
        except BaseException:
            with self._lock:
                del self._jobs[job_id]
            raise
        with self._lock:
            self._jobs[job_id] = (served, Path(socket_path))

    def remove_job(self, job_id: str, timeout: float = 10.0) -> None:
        """Stop ``job_id``'s server, cutting its open connections, and remove its socket; unknown ids are fine."""
        with self._lock:
            entry = self._jobs.pop(job_id, None)
        if entry is None:
            return
        served, socket_path = entry
        try:
            self._loop.call(self._stop(served), timeout)
        finally:
            remove_socket(socket_path)

    def job_ids(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, entry in self._jobs.items() if entry is not None]

    def connections(self, job_id: str) -> tuple[int, int]:
        """How many connections ``job_id``'s server has open now, and how many it accepted in all."""
        with self._lock:
            entry = self._jobs.get(job_id)
        if entry is None:
            return 0, 0
        gate = entry[0].gate
        return gate.open, gate.accepted

    async def _stop(self, served: Any) -> None:
        raise NotImplementedError


def listen_unix(path: Path, uid: int | None = None, gid: int | None = None, backlog: int = 128) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, owned by ``uid``:``gid`` when given.

    Owner and mode are set *before* ``listen()``: until then a connect() is refused, so no other user
    can slip in during set-up. Giving the socket to the container's uid (instead of mode 0666) means
    that only that uid (and root) can connect, on the host as in the container; the directory holding
    it must be searchable (x) by that uid. A path longer than a socket address may be (107 bytes: a deep
    state root, a long job id) is bound through ``/proc/self/fd/N/NAME`` of its directory.
    """
    path = Path(path)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind(sock, path)
        os.chmod(path, SOCKET_MODE)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        _remove_stale_socket(path)
        raise
    return sock


def _bind(sock: socket.socket, path: Path) -> None:
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        sock.bind(os.fspath(path))
        return
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{directory}/{path.name}"
        if len(os.fsencode(short)) > MAX_SOCKET_PATH:
            raise OSError(f"socket name {path.name!r} is too long for a Unix socket address")
        sock.bind(short)
    finally:
        os.close(directory)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by an earlier run; anything else at that path is an error, not ours to delete."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


def remove_socket(path: Path) -> None:
    """Remove a socket file we made; already gone is fine."""
    try:
        _remove_stale_socket(Path(path))
    except FileExistsError:
        log.warning("not removing %s: no longer a socket", path)


def notify(callback: Callable[..., None] | None, *args: Any) -> None:
    """Call an executor callback on the loop thread; its failure is logged, never raised into a relay."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # a callback bug must not cut a job's connection; the traceback goes to the log
        log.exception("callback %r failed", callback)
