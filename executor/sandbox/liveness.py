"""Liveness: heartbeats of a running agent and the decision that it has stalled.

Owns what counts as progress and when its absence becomes a stall. A running agent is alive while it
shows progress: a new stream line (partial messages count), real CPU work by its container since the
last beat (above the policy's ``stall_cpu_threshold``, because a CLI waiting on a request that never
answers still burns ~0.3 % of a core on timers), a wait the CLI announced itself (an ``api_retry``
line with its delay: a rate limit is weather, not a stall), or, for a sealed job, bytes of an answer
passing its API gateway (``saw_activity``; the API's pings count: a model thinking slowly is not a stall).
Every ``heartbeat_interval`` one heartbeat row records what was seen; ``stall_after`` without progress is
a stall.

Must never: block the job (a sample is two engine calls, ``stats`` and an ``exec_run`` that reads the pids
cgroup, once per heartbeat; failures to sample are recorded, not raised), or kill anything itself (it only
decides; the runtime acts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from ..agent.describe import clipped
from ..agent.events import Event
from ..policy import Policy
from .disk import DiskMeter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One look at a container: cumulative CPU time, memory in use, processes."""

    cpu_ns: int | None
    memory: int | None
    pids: int | None
    pids_limit_hits: int | None = None


# The kernel counts refused forks in the pids cgroup ("max N"); the count persists, so a fork bomb
# between two beats is still seen. v1 and v2 paths, as the container sees its own cgroup.
# Shell builtins only: at the limit, sh may start but cannot fork a `cat`.
_PIDS_EVENTS = ("for f in /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events; do "
                "[ -r $f ] && while read -r line; do echo \"$line\"; done < $f; done; true")


def pids_limit_hits(container: Container) -> int | None:
    try:
        result = container.exec_run(["sh", "-c", _PIDS_EVENTS], stdout=True, stderr=True)
    except (APIError, NotFound, requests.RequestException) as exc:
        return -1 if _exhausted(str(exc)) else None
    output = (result.output or b"").decode("utf-8", "replace")
    if result.exit_code not in (0, None) and _exhausted(output):
        return -1
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        if key == "max" and value.strip().isdigit():
            return int(value)
    return None


def _exhausted(text: str) -> bool:
    # No process could be started in the container: its pids limit is exhausted right now.
    text = text.lower()
    return "resource temporarily unavailable" in text or "cannot fork" in text


def sample(container: Container, pids_events: bool = True) -> Sample:
    """One look at the container; ``pids_events``: also read its pids cgroup (an exec in the container)."""
    try:
        stats = container.stats(stream=False, one_shot=True)
    except (APIError, NotFound, requests.RequestException):
        return Sample(None, None, None)
    cpu = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
    memory = stats.get("memory_stats") or {}
    pids = stats.get("pids_stats") or {}
    return Sample(cpu.get("total_usage"), memory.get("usage"), pids.get("current"),
                  pids_limit_hits(container) if pids_events else None)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat saw (a row of the heartbeat table)."""

    new_lines: int
    cpu_cores: float | None
    memory: int | None
    pids: int | None
    pids_limit_hits: int | None  # forks refused by the pids limit so far (-1: refused right now)
    state: str  # progress | api_streaming | waiting_api | idle
    idle_for: float
    last_activity: str
    disk: int | None = None  # bytes the job's writable layers use (the last measurement)


HeartbeatSink = Callable[[Beat], None]


class Watchdog:
    """Tracks one agent attempt's progress; ``check`` returns "stalled" once it has none for too long."""

    def __init__(self, policy: Policy, on_beat: HeartbeatSink, clock: Callable[[], float] = time.monotonic,
                 disk: DiskMeter | None = None) -> None:
        self.disk = disk
        self.interval = policy.heartbeat_interval
        self.stall_after = policy.stall_after
        self.cpu_threshold = policy.stall_cpu_threshold
        self.on_beat = on_beat
        self.clock = clock
        now = clock()
        self.last_progress = now
        self.last_progress_wall = time.time()
        self._last_beat = now
        self._lines = 0
        self._lines_at_beat = 0
        self._cpu_at_beat: int | None = None
        self._waiting_until = 0.0
        self.last_activity = "started"
        self.last_tool_call = ""
        self.last_beat: Beat | None = None
        self._activity_lock = threading.Lock()
        self._activity_at: float | None = None  # the gateway's last sign of life (set from another thread)
        self._activity_seen = float("-inf")  # the last of those already counted as progress
        self._api_active = False  # gateway activity since the last beat

    def saw_activity(self) -> None:
        """The job's API gateway passed on bytes of an answer (pings included). Any thread; never blocks."""
        now = self.clock()
        with self._activity_lock:
            self._activity_at = now

    def _take_activity(self) -> bool:
        """Count gateway activity seen since the last look as progress; whether there was any."""
        with self._activity_lock:
            at = self._activity_at
        if at is None or at <= self._activity_seen:
            return False
        self._activity_seen = at
        if at > self.last_progress:
            self.last_progress = at
            self.last_progress_wall = time.time() - (self.clock() - at)
        return True

    def saw_line(self, events: list[Event], activity: str) -> None:
        """A stream line arrived: that is progress."""
        now = self.clock()
        self._lines += 1
        self._progress(now)
        # Our own words for tool calls and turns; the stream state's line only when we have none yet.
        self.last_activity = self._describe(events) or (activity if self._lines == 1 else "") or self.last_activity
        for event in events:
            if event.kind == "api_retry":
                # The CLI said it waits before retrying: alive at least until then (plus one beat).
                delay = (event.data.get("retry_delay_ms") or 0) / 1000.0
                self._waiting_until = max(self._waiting_until, now + delay + self.interval)

    def _describe(self, events: list[Event]) -> str:
        """What the agent was doing, in words a person can act on (the last tool call or turn)."""
        text = ""
        for event in events:
            if event.kind == "tool_call":
                name = str(event.data.get("name"))
                self.last_tool_call = clipped(event.kind, event.data, len(name) + 2 + 120).rstrip(": ")
                text = f"tool call {self.last_tool_call}"
            elif event.kind == "tool_result":
                text = f"waiting for the model after tool call {self.last_tool_call}" if self.last_tool_call \
                    else "tool result"
            elif event.kind == "turn":
                text = f"turn: {clipped(event.kind, event.data, 120)}"
            elif event.kind == "api_retry":
                text = f"API retry after HTTP {event.data.get('error_status')}"
        return text

    def _progress(self, now: float) -> None:
        self.last_progress = now
        self.last_progress_wall = time.time()

    def start(self, container: Container, fresh: bool = True) -> None:
        """Take the CPU baseline the first beat measures against: zero for a container started just now
        (asking the engine would cost it CPU the agent's start-up needs), sampled for an adopted one."""
        if fresh:
            self._cpu_at_beat = 0
            return
        stats = sample(container, pids_events=False)  # no exec: the pids are read at the beats
        self._cpu_at_beat = stats.cpu_ns

    @property
    def waiting_api(self) -> bool:
        return self.clock() < self._waiting_until

    def check(self, container: Container) -> str | None:
        """Beat when an interval has passed; return "disk_limit" when the job wrote more than its cap,
        "stalled" when progress has been absent too long."""
        now = self.clock()
        if self.disk is not None and self.disk.measure() is not None and self.disk.over:
            return "disk_limit"
        if self._take_activity():
            self._api_active = True
        if now - self._last_beat >= self.interval:
            self._beat(container, now)
        if self.waiting_api:
            return None
        if now - self.last_progress >= self.stall_after:
            return "stalled"
        return None

    def _beat(self, container: Container, now: float) -> None:
        current = sample(container)
        elapsed = now - self._last_beat
        cores = None
        if current.cpu_ns is not None and self._cpu_at_beat is not None and elapsed > 0:
            cores = max(0.0, (current.cpu_ns - self._cpu_at_beat) / 1e9 / elapsed)
        new_lines = self._lines - self._lines_at_beat
        if new_lines == 0 and cores is not None and cores >= self.cpu_threshold:
            self._progress(now)  # real work without output (a long build, a test run)
        if new_lines or (cores is not None and cores >= self.cpu_threshold):
            state = "progress"
        elif self._api_active:
            state = "api_streaming"  # only the gateway saw the answer move (a slow answer, pings)
        elif self.waiting_api:
            state = "waiting_api"
            self._progress(now)
        else:
            state = "idle"
        self._last_beat = now
        self._api_active = False
        self._lines_at_beat = self._lines
        if current.cpu_ns is not None:
            self._cpu_at_beat = current.cpu_ns
        beat = Beat(new_lines=new_lines, cpu_cores=None if cores is None else round(cores, 4),
                    memory=current.memory, pids=current.pids, pids_limit_hits=current.pids_limit_hits, state=state,
                    idle_for=round(now - self.last_progress, 1), last_activity=self.last_activity,
                    disk=self.disk.bytes if self.disk is not None else None)
        self.last_beat = beat
        try:
            self.on_beat(beat)
        except Exception:  # noqa: BLE001 - a heartbeat that cannot be written must not stop the job
            log.exception("heartbeat not recorded")
