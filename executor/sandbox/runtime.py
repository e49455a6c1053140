"""Runtime: one agent attempt and one test run inside their containers, watched line by line.

Owns acting inside a started sandbox: reading the agent's JSON-lines output as it arrives into events (what
a line means is the job's agent's: ``agent/seam.py``), the wall-clock timeout, the grace period after the
CLI reported its end, stopping a run on cancel, shutdown or a stall the watchdog calls, and running the test
command in a fresh container on the test view. Starting and removing containers is ``deployment.py``; the
CLI's command line is its agent's (``Agent.launch``). An engine
that stops answering, or loses a container, ends the run with ``EngineUnavailable`` and leaves the container
as it is (whoever recovers the job looks at it): what a run sees then is the engine's doing, not the job's.

Must never: choose a model or runner other than the job's, or decide what happens to the workspace.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from ..agent.events import Event, parse_line
from ..agent.launch import CONFIG_MOUNT, PIDS_LINE, container_command, refused_forks
from ..agent.outcome import Outcome
from ..agent.seam import Agent, Launch, Run
from ..errors import EngineUnavailable
from ..policy import Policy
from ..transaction.workspace import Workspace
from .deployment import AGENT_HOME, ContainerSpec, Deployment, Limits
from .disk import DiskMeter
from .health import timed_out
from .liveness import Watchdog

log = logging.getLogger(__name__)

#: returns why the run must stop now ("cancelled", "shutdown") or None to go on
StopCheck = Callable[[], str | None]
#: receives the events of each stream line as it arrives, with the line's number (1-based)
EventSink = Callable[[list[tuple[list[Event], int]]], None]
#: Seconds the events of consecutive stream lines are gathered before they are written in one transaction
#: (a line each would cost one fsync each: partial messages come dozens a second).
FLUSH_EVERY = 0.2
#: Lines' events gathered at most before they are written anyway (a flood of lines within FLUSH_EVERY).
FLUSH_LINES = 500
#: Events of one watched attempt's stream that are stored; past it only their count (one more event): what
#: the agent prints must not grow the store without end. A CLI's real run stores a few per turn.
STREAM_EVENT_CAP = 50_000

OUTPUT_TAIL = 4000


@dataclass
class AgentRun:
    outcome: Outcome
    state: Run
    exit_code: int | None
    oom_killed: bool = False
    stopped: str | None = None  # "timeout" | "cancelled" | "shutdown" | "stalled": the executor ended it
    lingered: bool = False  # the CLI did not exit within the grace period after its result line
    stderr_tail: str = ""
    container_id: str | None = None
    lines: int = 0
    refused_forks: int = 0
    last_activity: str = ""
    last_alive: float | None = None  # wall-clock time of the last progress
    disk_used: int | None = None  # bytes of the job's writable layers at the last measurement
    disk_full: str = ""  # what the job's disk image ran out of (space, inodes), not only a figure over the cap


@dataclass
class TestRun:
    __test__ = False  # not a pytest class
    command: str
    exit_code: int | None
    output_tail: str
    timed_out: bool = False
    oom_killed: bool = False
    stopped: str | None = None
    duration: float = 0.0
    disk_used: int | None = None
    disk_full: str = ""

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.stopped is None


#: The longest stream line kept: the agent can write anything to the CLI's stdout, a line without an end
#: included. A longer one is cut to a note of its size (the CLI's own lines are far shorter: partial messages,
#: tool results it clips itself).
MAX_LINE = 2 * 2**20
#: Bytes of lines read but not yet handled, per job: past it the reader waits (the engine keeps the log).
QUEUED_BYTES = 4 * 2**20


class LineQueue:
    """The lines between a job's reader thread and its watcher, bounded in bytes: ``put`` waits while the
    lines queued hold ``limit`` bytes (one line always fits), so a flood of output is held by the engine's
    log, never by the executor's memory."""

    def __init__(self, limit: int = QUEUED_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        self._lines: list[bytes | None] = []
        self._changed = threading.Condition()

    def put(self, line: bytes | None, timeout: float | None = None) -> bool:
        """Queue ``line`` (None: the end); False when it did not fit within ``timeout``."""
        size = len(line) if line else 0
        with self._changed:
            if not self._changed.wait_for(lambda: not self._lines or self.bytes + size <= self.limit, timeout):
                return False
            self._lines.append(line)
            self.bytes += size
            self._changed.notify_all()
            return True

    def get(self, timeout: float) -> bytes | None:
        """The next line; ``queue.Empty`` when none came within ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._lines, timeout):
                raise queue.Empty
            line = self._lines.pop(0)
            self.bytes -= len(line) if line else 0
            self._changed.notify_all()
            return line


def _pump_lines(container: Container, sink: LineQueue, stop: threading.Event) -> None:
    """Reader thread: stdout of the container, split into lines of at most ``MAX_LINE`` bytes (a longer one
    becomes a note of its size); None marks the end. Stops when ``stop`` is set (its watcher is gone)."""
    buffer, cut = b"", 0  # cut: bytes of an over-long line dropped so far (its end not yet seen)

    def put(line: bytes) -> None:
        while not sink.put(line, timeout=0.5):
            if stop.is_set():
                raise _Abandoned

    try:
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=False):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if cut:
                    line, cut = _cut_note(cut + len(line)), 0
                put(line)
            if len(buffer) > MAX_LINE:
                cut += len(buffer)
                buffer = b""
    except (APIError, NotFound, requests.RequestException) as exc:
        log.debug("log stream ended: %s", exc)
    except _Abandoned:
        return
    if buffer or cut:
        sink.put(_cut_note(cut + len(buffer)) if cut else buffer)
    sink.put(None)


class _Abandoned(Exception):
    """The watcher stopped reading: the reader ends without queueing more."""


def _cut_note(size: int) -> bytes:
    return f"[executor: a stream line of {size} bytes was cut: longer than {MAX_LINE} bytes]".encode()


def _wait_exit(container: Container, timeout: float = 30.0) -> tuple[int | None, bool]:
    """The container's exit code and whether it was killed for memory; ``(None, False)`` while it still runs
    after ``timeout``. ``EngineUnavailable`` when the engine does not answer or lost the container (an engine
    restart): then nothing the container did can be read, and whoever recovers the job decides."""
    try:
        status = container.wait(timeout=timeout)
        container.reload()
        return status.get("StatusCode"), bool(container.attrs["State"].get("OOMKilled"))
    except NotFound:
        raise EngineUnavailable(f"the container {container.name} is gone (the engine lost it)") from None
    except (requests.RequestException, APIError) as exc:
        if timed_out(exc):
            return None, False
        raise EngineUnavailable(f"the engine does not answer about {container.name}: {exc}") from None


def _kill(container: Container) -> None:
    try:
        container.kill()
    except (APIError, NotFound):
        pass  # already gone
    except requests.RequestException as exc:
        raise EngineUnavailable(f"the engine does not answer about {container.name}: {exc}") from None


def _stderr_tail(container: Container) -> str:
    try:
        return container.logs(stdout=False, stderr=True, tail=40).decode("utf-8", "replace")[-OUTPUT_TAIL:]
    except (APIError, NotFound):
        return ""
    except requests.RequestException as exc:
        raise EngineUnavailable(f"the engine does not answer about {container.name}: {exc}") from None


def agent_spec(ws: Workspace, policy: Policy, launch: Launch, sockets: str | None = None,
               config: str | None = None) -> ContainerSpec:
    """The agent's container. ``sockets``: a sealed job's socket directory (its network is then none and its
    command starts with the forwarder); ``config``: the directory holding the launch's files, mounted read-only
    at ``CONFIG_MOUNT``."""
    if policy.sealed != (sockets is not None):
        raise ValueError("a sealed policy needs the job's socket directory, and only a sealed one gets it")
    if bool(launch.files) != (config is not None):
        raise ValueError("the agent's configuration files need their directory, and only they get one")
    return ContainerSpec(
        name=f"executor-{ws.job_id}-a{ws.attempt}-agent",
        command=container_command(launch.argv, sealed=policy.sealed),
        home_volume=ws.home_volume if ws.home is not None else None,
        tmpfs_size=tmpfs_size(policy),
        user=f"{ws.uid}:{ws.gid}",
        volume=ws.volume,
        limits=Limits(policy.cpus, policy.memory, policy.pids),
        network="none" if policy.sealed else policy.network,
        labels=ws.labels("agent"),
        environment=launch.environment,
        sockets=sockets,
        runtime=policy.runtime or "runc",
        read_only_binds={config: CONFIG_MOUNT} if config is not None else {},
    )


def tmpfs_size(policy: Policy) -> int:
    """Each tmpfs of a job container: 512 MiB, never more than the job's disk limit (tmpfs is memory
    outside the job's disk, so its size is its cap)."""
    return min(512 * 2**20, policy.disk)


def watch_agent(sandbox: Deployment, container: Container, policy: Policy, agent: Agent, *, on_events: EventSink,
                should_stop: StopCheck, result_grace: float, watchdog: Watchdog,
                skip_lines: int = 0, adopted: bool = False) -> AgentRun:
    """Read the agent's stream to its end (or stop it), then classify how it ended (both as ``agent`` says).

    ``adopted``: the container was started before a restart of the executor (not just now);
    ``skip_lines``: when adopting a container after a restart, its stream is read again from the start;
    the first ``skip_lines`` lines only rebuild the state, their events are already in the store.
    """
    state = agent.run()
    lines, abandoned = LineQueue(), threading.Event()
    reader = threading.Thread(target=_pump_lines, args=(container, lines, abandoned), daemon=True,
                              name=f"stream-{container.name}")
    reader.start()
    watchdog.start(container, fresh=not adopted)
    deadline = time.monotonic() + policy.timeout
    result_seen_at: float | None = None
    stopped: str | None = None
    lingered = False
    seen = 0
    pending: list[tuple[list[Event], int]] = []
    stored = dropped = 0  # events of this watch stored, and not stored past STREAM_EVENT_CAP
    flushed_at = time.monotonic()
    try:
        while True:
            try:
                raw = lines.get(timeout=0.5)
            except queue.Empty:
                raw = b""
            if raw is None:
                break
            if raw:
                msg = parse_line(raw)
                if msg is not None:
                    seen += 1
                    events = state.feed(msg)
                    watchdog.saw_line(events, state.last_activity)
                    if seen > skip_lines and events:
                        if stored < STREAM_EVENT_CAP:
                            pending.append((events, seen))
                            stored += len(events)
                        else:
                            dropped += len(events)
            now = time.monotonic()
            if pending and (now - flushed_at >= FLUSH_EVERY or len(pending) >= FLUSH_LINES):
                on_events(pending)
                pending, flushed_at = [], now
            if state.ended and result_seen_at is None:
                result_seen_at = now
            if stopped or lingered:
                continue  # killed: drain what is left until the stream ends
            if result_seen_at is not None and now - result_seen_at > result_grace:
                # The CLI has been seen to hang after its result line in headless runs: its work is done.
                lingered = True
                _kill(container)
            elif now > deadline:
                stopped = "timeout"
                _kill(container)
            elif (why := should_stop()) is not None or (why := watchdog.check(container)) is not None:
                stopped = why
                _kill(container)
        if dropped:
            pending.append(([Event("events_capped", {"stored": stored, "not_stored": dropped,
                                                     "cap": STREAM_EVENT_CAP})], seen))
        if pending:
            on_events(pending)
    finally:
        abandoned.set()  # a reader blocked on a full queue ends too (an error here included)
    reader.join(timeout=10)
    exit_code, oom = _wait_exit(container)
    if exit_code is None and not (stopped or lingered):
        # The stream ended but the container runs on: the engine lost our stream (a restart that kept its
        # containers). It is left running for the job's recovery to adopt.
        raise EngineUnavailable(f"the agent's output stream ended while its container {container.name} still runs")
    stderr = _stderr_tail(container)
    run = AgentRun(outcome=agent.classify(state, None if lingered else exit_code), state=state,
                   exit_code=exit_code, oom_killed=oom, stopped=stopped, lingered=lingered,
                   stderr_tail=PIDS_LINE.sub("", stderr).strip(), refused_forks=refused_forks(stderr),
                   container_id=container.id, lines=seen,
                   last_activity=watchdog.last_activity, last_alive=watchdog.last_progress_wall,
                   disk_used=watchdog.disk.bytes if watchdog.disk is not None else None,
                   disk_full=watchdog.disk.full if watchdog.disk is not None else "")
    sandbox.remove(container)
    return run


#: Where a graded test run's own directory (``transaction.workspace.fresh_run_dir``) is mounted.
RUN_DIR_MOUNT = "/executor-run"


def run_tests(sandbox: Deployment, ws: Workspace, command: str, policy: Policy, *,
              should_stop: StopCheck, disk: DiskMeter | None = None, view: str = "test",
              run_dir: Path | None = None, environment: dict[str, str] | None = None,
              argv: list[str] | None = None, timeout: float | None = None) -> TestRun:
    """The test command in a fresh container on a test view (by default the job's change over the repository),
    network none, same limits; ``disk`` measures the job's layers (its change and what the tests write)
    against the job's disk cap.

    For the graded gate: ``run_dir`` is mounted read-write at ``RUN_DIR_MOUNT`` (the report goes there),
    ``environment`` is added, ``argv`` replaces ``sh -c command`` (a wrapper around it), and ``timeout``
    (seconds, at most ``test_timeout``) bounds this run.
    """
    spec = ContainerSpec(
        name=f"executor-{ws.job_id}-a{ws.attempt}-tests" + ("" if view == "test" else f"-{view}"),
        command=argv or ["sh", "-c", command],
        user=f"{ws.uid}:{ws.gid}",
        volume=ws.view_volume(view),
        limits=Limits(policy.cpus, policy.memory, policy.pids),
        network="none",
        labels=ws.labels("tests"),
        tmpfs_size=tmpfs_size(policy),
        environment={"HOME": AGENT_HOME, "CI": "true", **(environment or {})},
        binds={str(run_dir): RUN_DIR_MOUNT} if run_dir is not None else {},
        runtime=policy.runtime or "runc",
    )
    started = time.monotonic()
    container = sandbox.start(spec)
    deadline = started + min(policy.test_timeout, timeout if timeout is not None else policy.test_timeout)
    timed_out = False
    stopped = None
    exit_code: int | None = None
    oom = False
    while True:
        exit_code, oom = _wait_exit(container, timeout=1.0)
        if exit_code is not None:
            break
        if time.monotonic() > deadline:
            timed_out = True
        elif (why := should_stop()) is not None:
            stopped = why
        elif disk is not None and disk.measure() is not None and disk.over:
            stopped = "disk_limit"
        if timed_out or stopped:
            _kill(container)
            exit_code, oom = _wait_exit(container)
            break
    try:
        output = container.logs(stdout=True, stderr=True, tail=200).decode("utf-8", "replace")
    except (APIError, NotFound):
        output = ""
    except requests.RequestException as exc:
        raise EngineUnavailable(f"the engine does not answer about {container.name}: {exc}") from None
    sandbox.remove(container)
    return TestRun(command=command, exit_code=exit_code, output_tail=output[-OUTPUT_TAIL:],
                   timed_out=timed_out, oom_killed=oom, stopped=stopped,
                   duration=time.monotonic() - started, disk_used=disk.bytes if disk is not None else None,
                   disk_full=disk.full if disk is not None else "")
