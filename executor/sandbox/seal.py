"""The sealed sandbox's host side as one thing the executor starts, stops and asks for a job's sockets.

A sealed job's container runs with network ``none``. Per attempt the executor serves two Unix sockets in
the job's ``sock/`` directory (root-owned, mode 0711; each socket mode 0600 and owned by the job's uid),
bind-mounted read-only at ``/run/executor``: ``api.sock``, the job's API gateway (``gateway.py``), and
``egress.sock``, its egress proxy (``egress.py``). The container's command starts with ``executor-forward``
(``sandbox/forward.py``, in the image), which exposes them on loopback ports 8080 and 3128 before the CLI
runs; the CLI's environment points at those and holds a placeholder credential. Socket = job: which job
speaks is known from the socket it connected to, so there is no token to steal.

Owns: the threads every job shares (the event loop, the recorder, the gateways' parse thread and spool I/O
pool), opening and closing a job's sockets with its ``SealLimits``, the container side of the contract (mount
point, ports, forwarder command, environment), and handing what a gateway or proxy reports to the job's
hooks: ``activity`` on the loop thread (it must be quick); everything else goes to the job's journal
(``journal.py``: aggregated, capped) and from there, a batch at a time, to ``Hooks.write`` on the recorder
thread, or on the closing thread when the job closes: closing a job waits for its own records only.

Must never: put the real credential into the container's environment, command or mounts, serve a socket
outside the job's directory, run a hook's blocking work on the loop thread, or keep a report of a job
beyond the journal's bound.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..egress_rules import Rule
from .deployment import SOCKETS_MOUNT
from .egress import EgressCallbacks, EgressProxies
from .gateway import GatewayCallbacks, Gateways, Limits, Refusal, Upstream
from .journal import Batch, JobJournal
from .loop import LoopThread, Recorder

API_PORT, PROXY_PORT = 8080, 3128
API_SOCKET, EGRESS_SOCKET = "api.sock", "egress.sock"
#: Where a sealed container's CLI finds its API: the gateway, through the forwarder (each agent names the
#: variable or setting its CLI reads it from, and the path it adds).
API_URL = f"http://127.0.0.1:{API_PORT}"
_LOOPBACK = "127.0.0.1,localhost"


def forward_command(command: list[str]) -> list[str]:
    """``command`` behind the forwarder, which opens the loopback ports first (its stdout stays the CLI's)."""
    return ["executor-forward", f"{API_PORT}={SOCKETS_MOUNT}/{API_SOCKET}",
            f"{PROXY_PORT}={SOCKETS_MOUNT}/{EGRESS_SOCKET}", "--", *command]


def sealed_environment() -> dict[str, str]:
    """Where a sealed container's CLI and tools find the outside: the egress proxy on loopback, through the
    forwarder (the API is at ``API_URL``). Both spellings of the proxy variables (curl and some libraries read
    only the lower-case ones); the loopback is never proxied (the CLI would send its API calls to the proxy)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    return {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": _LOOPBACK, "no_proxy": _LOOPBACK}


@dataclass(frozen=True)
class Hooks:
    """What the executor does with one job's reports. ``activity`` runs on the loop thread (quick, thread-safe).
    ``write`` writes one batch in one transaction and returns the ids of the events it made for
    ``batch.new()``, in order; it runs on the recorder thread, or on the job's closing thread."""

    write: Callable[[Batch], list[int]]
    activity: Callable[[], None]


@dataclass(frozen=True)
class SealLimits:
    """What one job's sockets may make the executor hold (EXECUTOR_GATEWAY_CONNECTIONS, EXECUTOR_EGRESS_CONNECTIONS,
    EXECUTOR_GATEWAY_PARSE_MEMORY, EXECUTOR_SEALED_EVENT_CAP)."""

    gateway_connections: int = 8
    egress_connections: int = 8
    parse_memory: int = 96 * 1024 * 1024
    event_cap: int = 200


#: How many distinct models a job's refusals keep (the stop check needs one; the message names a few).
_MODELS_KEPT = 8


@dataclass
class Sealed:
    """One job's open sockets; ``refused_models`` fills on the loop thread the moment a model the agent asked for
    is refused, ``answered_models`` the moment an answer from another model is cut (or seen in a record), the
    first few distinct ones each: a job cannot grow them."""

    job_id: str
    directory: Path
    journal: JobJournal | None = None
    refused_models: list[str] = field(default_factory=list)
    answered_models: list[str] = field(default_factory=list)

    def refused(self) -> bool:
        return bool(self.refused_models or self.answered_models)

    def model_refused(self, model: str) -> None:
        if model not in self.refused_models and len(self.refused_models) < _MODELS_KEPT:
            self.refused_models.append(model)

    def answered_by(self, model: str) -> None:
        if model not in self.answered_models and len(self.answered_models) < _MODELS_KEPT:
            self.answered_models.append(model)


class Sealer:
    """Every sealed job's gateway and proxy, on one loop thread, with one recorder thread. Thread-safe."""

    def __init__(self) -> None:
        self.loop = LoopThread("sandbox-io")
        self.recorder = Recorder("sandbox-recorder")
        self.gateways = Gateways(self.loop)
        self.proxies = EgressProxies(self.loop)
        self.started = False

    def start(self) -> Sealer:
        self.loop.start()
        self.recorder.start()
        self.gateways.start()
        self.started = True
        return self

    def threads(self) -> dict[str, threading.Thread]:
        """The side threads the executor watches (their death stops it)."""
        if not self.started:
            return {}
        return {"sandbox event loop": self.loop.thread, "sandbox recorder": self.recorder.thread,
                "sandbox body parser": self.gateways.parser.thread}

    def stop(self) -> None:
        """After every job closed: let the recorder finish, then stop the threads."""
        for job_id in self.gateways.job_ids():
            self.close(job_id)
        if self.loop.thread.is_alive():
            self.gateways.close()
        self.recorder.stop()
        self.loop.stop()

    def open(self, job_id: str, directory: Path, upstream: Upstream, rules: list[Rule], uid: int, gid: int,
             hooks: Hooks, limits: SealLimits | None = None, spool: Path | None = None) -> Sealed:
        """Serve ``job_id``'s gateway and proxy in ``directory`` (made root-owned 0711 if missing); returns once
        both listen. The same directory again (adoption after a restart) replaces stale sockets. ``spool``: the
        directory its large request bodies go to (default: ``bodies`` beside ``directory``)."""
        if not self.started:
            raise RuntimeError("the sealed sandbox's threads are not running (Sealer.start)")
        limits = limits or SealLimits()
        _own_directory(directory)
        journal = JobJournal(job_id, limits.event_cap, lambda: self.recorder.ready(job_id))
        sealed = Sealed(job_id, directory, journal)
        self.recorder.open(job_id, journal, hooks.write)

        def refused(refusal: Refusal) -> None:
            if refusal.kind == "model":
                sealed.model_refused(refusal.requested_model or "")  # at once: the stop check reads it
            elif refusal.kind == "answer":
                sealed.answered_by(refusal.requested_model or "")
            journal.refusal(refusal)

        try:
            self.gateways.add_job(job_id, directory / API_SOCKET, upstream, GatewayCallbacks(
                on_request=journal.request, on_refusal=refused, on_activity=lambda _job: hooks.activity()),
                uid=uid, gid=gid, spool=spool, limits=Limits(limits.gateway_connections, limits.parse_memory))
            try:
                self.proxies.add_job(job_id, directory / EGRESS_SOCKET, rules, EgressCallbacks(journal.egress),
                                     uid=uid, gid=gid, connections=limits.egress_connections)
            except BaseException:
                self.gateways.remove_job(job_id)
                raise
        except BaseException:
            self.recorder.close(job_id)
            raise
        return sealed

    def close(self, job_id: str) -> None:
        """Stop the job's gateway and proxy (cutting open connections), remove its sockets, and write what they
        reported (in this thread: no other job's records are waited for). Unknown jobs are fine (closing
        twice is)."""
        try:
            self.gateways.remove_job(job_id)
        finally:
            try:
                self.proxies.remove_job(job_id)
            finally:
                self.recorder.close(job_id)


def _own_directory(directory: Path) -> None:
    """The socket directory: a real directory (never a symlink), root's, searchable but not listable."""
    directory.mkdir(mode=0o711, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"{directory} is not a directory; refusing to serve sockets there")
    os.chown(directory, os.getuid(), os.getgid())
    os.chmod(directory, 0o711)
