"""Request bodies of a sealed job's gateway: read into memory up to a small threshold and spooled beyond it to
an unnamed file in the job's own directory, checked off the event loop by one parse worker that serves the
jobs in turn, and forwarded from the very bytes that were checked.

Owns: ``Spool`` (the job's spool directory, root's, pinned by a descriptor; each body an ``O_TMPFILE`` in it:
no name, so neither the job nor anyone else can open or change it, and it is gone when closed),
``read_body`` (at most ``IN_MEMORY`` bytes of a body in memory, the rest written to the spool file as it
arrives; more than ``MAX_BODY`` or a full disk is a 413), ``Body`` (its bytes for the strict parse, and its
chunks for the upstream, both from the same file), and ``ParsePool`` (one thread; each job has its own queue
and the thread takes one body of each job in turn, so one job's bodies wait behind at most one body of each
other job); and the request-level checks around them: ``check_head`` (a compressed body, or one announced
larger than ``MAX_BODY``, is refused before it is read) and ``until_hangup`` (a request never outlives its
connection).

Must never: hold more than ``IN_MEMORY`` bytes of one body in memory outside the parse worker, name a spool
file, parse a large body on the event loop, or block the event loop on a file (spool writes and reads run on
a small I/O pool: a page-cache write can block when the disk is busy), or hand a parsed body to the loop
(the worker returns what the caller asks of it, e.g. the model, and drops the rest).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .strict_json import BodyRefused, decode, loads

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY = 32 * 1024 * 1024  # the API's own request limit
IN_MEMORY = 128 * 1024  # a body up to this size stays in memory (the CLI's requests are 50 to 300 KB)
CHUNK = 64 * 1024


class ClientGone(Exception):
    """The client hung up before its request was complete: nobody is left to answer."""


class Spool:
    """A job's spool directory: a real directory (never a link), root's, mode 0700, held by a descriptor."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(self.fd).st_uid != os.getuid():
                raise FileExistsError(f"{path} is not the executor's own directory; refusing to spool there")
            os.fchmod(self.fd, 0o700)
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path

    def file(self) -> int:
        """A fresh unnamed file in the directory, open for reading and writing."""
        try:
            return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
        # A file system without O_TMPFILE: a fresh name, unlinked at once.
        name = f".body-{secrets.token_hex(8)}"
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        os.unlink(name, dir_fd=self.fd)
        return fd

    def close(self) -> None:
        os.close(self.fd)


class Body:
    """One request body: in memory (``data``), or in an unnamed spool file (``fd``)."""

    def __init__(self, data: bytes | None = None, fd: int | None = None, size: int = 0) -> None:
        self.data, self.fd, self.size = data, fd, size if data is None else len(data)

    def read(self) -> bytes:
        """All of it (the parse worker's copy of a spooled body)."""
        if self.data is not None:
            return self.data
        parts, offset = [], 0
        while offset < self.size:
            part = os.pread(self.fd, self.size - offset, offset)
            if not part:
                raise OSError(f"spool file ended at {offset} of {self.size} bytes")
            parts.append(part)
            offset += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def parse(self, budget: int) -> Any:
        """The strict parse (``strict_json``), the spooled bytes read here and dropped once decoded."""
        return loads(decode(self.read(), budget))

    async def chunks(self, io: ThreadPoolExecutor) -> AsyncIterator[bytes]:
        """The body as the upstream gets it: the very bytes that were checked."""
        if self.data is not None:
            yield self.data
            return
        loop, offset = asyncio.get_running_loop(), 0
        while offset < self.size:
            part = await loop.run_in_executor(io, os.pread, self.fd, min(CHUNK, self.size - offset), offset)
            if not part:
                raise OSError(f"spool file ended at {offset} of {self.size} bytes")
            offset += len(part)
            yield part

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def read_body(receive: Callable, spool: Spool, io: ThreadPoolExecutor) -> Body:
    """The whole request body: in memory up to ``IN_MEMORY`` bytes, then spooled. ``BodyRefused`` (413) past
    ``MAX_BODY`` or when the job's disk cannot take it; ``ClientGone`` when the client hangs up first."""
    chunks: list[bytes] = []
    size, fd = 0, None
    loop = asyncio.get_running_loop()
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyRefused(413, "request_too_large", f"request body larger than {MAX_BODY} bytes")
            if fd is None and size > IN_MEMORY:
                fd = await loop.run_in_executor(io, spool.file)
                chunk, chunks = b"".join(chunks) + chunk, []
            if fd is None:
                chunks.append(chunk)
            elif chunk:
                await loop.run_in_executor(io, _write_all, fd, chunk)
            if not message.get("more_body", False):
                return Body(fd=fd, size=size) if fd is not None else Body(b"".join(chunks))
    except OSError as exc:
        _close(fd)
        raise BodyRefused(413, "request_too_large", f"request body of more than {size - len(chunk)} bytes does "
                                                    f"not fit in the job's disk ({os.strerror(exc.errno or 0)})"
                          ) from None
    except BaseException:
        _close(fd)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class ParsePool:
    """One thread parsing bodies for every job's gateway; each job has its own queue, served in turn.

    Its memory is bounded by the one body it parses at a time (the estimate each parse is held to): a job
    with many large bodies waits for its own, and every other job's next body is taken before its second."""

    def __init__(self, name: str = "sandbox-parse") -> None:
        self._queues: dict[str, deque[tuple[asyncio.Future, Callable[[], Any]]]] = {}
        self._turns: deque[str] = deque()  # jobs with work waiting, in the order they are served
        self._ready = threading.Condition()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ParsePool:
        _return_large_blocks()
        self.thread.start()
        return self

    async def run(self, job_id: str, work: Callable[[], T]) -> T:
        """``work()`` on the pool's thread, in ``job_id``'s turn; its result or exception here."""
        future = asyncio.get_running_loop().create_future()
        with self._ready:
            queue = self._queues.setdefault(job_id, deque())
            if not queue:
                self._turns.append(job_id)
            queue.append((future, work))
            self._ready.notify()
        return await future

    def stop(self, timeout: float = 10.0) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _next(self) -> tuple[asyncio.Future, Callable[[], Any]] | None:
        with self._ready:
            while not self._turns and not self._stopping:
                self._ready.wait()
            if not self._turns:
                return None
            job_id = self._turns.popleft()
            queue = self._queues[job_id]
            item = queue.popleft()
            if queue:
                self._turns.append(job_id)  # its next body after every other job's
            else:
                del self._queues[job_id]
            return item

    def _run(self) -> None:
        while (item := self._next()) is not None:
            self._serve(*item)
            del item  # nothing of a served body may stay alive while the thread waits for the next one

    @staticmethod
    def _serve(future: asyncio.Future, work: Callable[[], Any]) -> None:
        if future.cancelled():  # the client hung up or the job closed while it waited
            return
        try:
            result, error = work(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which answers it
            result, error = None, exc
        try:
            future.get_loop().call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


def _return_large_blocks() -> None:
    """Have glibc map every block of 1 MiB or more on its own, so that a parsed body's memory goes back to the
    system when it is freed. Its default threshold moves up to the largest block freed (32 MiB), and below it
    each thread's arena keeps what it once held (up to twice the threshold untrimmed): a few large bodies would
    leave the process that much bigger for good. Process-wide; nothing on other C libraries."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 2 * 1024 * 1024)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def check_head(scope: dict) -> None:
    """Refuse what the upstream would read differently from the gateway before reading the body."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise BodyRefused(400, "invalid_request_error",
                          f"request bodies must not be compressed (content-encoding {encoding[:300]!r}): the "
                          "gateway checks the JSON it forwards")
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise BodyRefused(413, "request_too_large", f"request body larger than {MAX_BODY} bytes")


async def until_hangup(work: Awaitable[T], receive: Callable) -> T:
    """``work``'s result, or ClientGone (``work`` cancelled) when the client hangs up first: a request never
    outlives its connection, so the connection limit bounds the requests too."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, hangup, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
