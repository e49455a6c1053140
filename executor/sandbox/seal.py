"""The sealed sandbox's host side as one thing the executor starts, stops and asks for a job's sockets.

A sealed job's container runs with network ``none``. Per attempt the executor serves two Unix sockets in
the job's ``sock/`` directory (root-owned, mode 0711; each socket mode 0600 and owned by the job's uid),
bind-mounted read-only at ``/run/executor``: ``api.sock``, the job's API gateway (``gateway.py``), and
``egress.sock``, its egress proxy (``egress.py``). The container's command starts with ``executor-forward``
(``sandbox/forward.py``, in the image), which exposes them on loopback ports 8080 and 3128 before the CLI
runs; the CLI's environment points at those and holds a placeholder credential. Socket = job: which job
speaks is known from the socket it connected to, so there is no token to steal.

Owns: the event loop thread and the recorder thread every job shares (``loop.py``), opening and closing a
job's sockets, the container side of the contract (mount point, ports, forwarder command, environment), and
handing what a gateway or proxy reports to the job's hooks: ``activity`` on the loop thread (it must be
quick), everything else on the recorder thread (it may write to the store).

Must never: put the real credential into the container's environment, command or mounts, serve a socket
outside the job's directory, or run a hook's blocking work on the loop thread.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..egress_rules import Rule
from .deployment import SOCKETS_MOUNT
from .egress import EgressCallbacks, EgressEvent, EgressProxies
from .gateway import GatewayCallbacks, Gateways, Refusal, RequestRecord, Upstream
from .loop import LoopThread, Recorder

API_PORT, PROXY_PORT = 8080, 3128
API_SOCKET, EGRESS_SOCKET = "api.sock", "egress.sock"
#: What the container holds instead of the runner's credential (the gateway swaps in the real one).
PLACEHOLDER_CREDENTIAL = "sk-ant-sealed-placeholder-not-a-credential"
_LOOPBACK = "127.0.0.1,localhost"


def forward_command(command: list[str]) -> list[str]:
    """``command`` behind the forwarder, which opens the loopback ports first (its stdout stays the CLI's)."""
    return ["executor-forward", f"{API_PORT}={SOCKETS_MOUNT}/{API_SOCKET}",
            f"{PROXY_PORT}={SOCKETS_MOUNT}/{EGRESS_SOCKET}", "--", *command]


def sealed_environment() -> dict[str, str]:
    """Where a sealed container's CLI and tools find the API and the outside: loopback, through the forwarder.
    Both spellings of the proxy variables (curl and some libraries read only the lower-case ones); the
    loopback is never proxied (the CLI would send its API calls to the proxy)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    return {"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{API_PORT}",
            "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": _LOOPBACK, "no_proxy": _LOOPBACK}


@dataclass(frozen=True)
class Hooks:
    """What the executor does with one job's reports. ``activity`` runs on the loop thread (quick, thread-safe);
    the others on the recorder thread, in the order the reports were made."""

    request: Callable[[RequestRecord], None]
    refusal: Callable[[Refusal], None]
    egress: Callable[[EgressEvent], None]
    activity: Callable[[], None]


@dataclass
class Sealed:
    """One job's open sockets; ``refused_models`` fills on the loop thread the moment a model is refused."""

    job_id: str
    directory: Path
    refused_models: list[str] = field(default_factory=list)

    def refused(self) -> bool:
        return bool(self.refused_models)


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
        self.started = True
        return self

    def threads(self) -> dict[str, threading.Thread]:
        """The side threads the executor watches (their death stops it)."""
        if not self.started:
            return {}
        return {"sandbox event loop": self.loop.thread, "sandbox recorder": self.recorder.thread}

    def stop(self) -> None:
        """After every job closed: let the recorder finish, then stop both threads."""
        for job_id in self.gateways.job_ids():
            self.close(job_id)
        if self.loop.thread.is_alive():
            self.gateways.close()
        self.recorder.flush()
        self.recorder.stop()
        self.loop.stop()

    def open(self, job_id: str, directory: Path, upstream: Upstream, rules: list[Rule], uid: int, gid: int,
             hooks: Hooks) -> Sealed:
        """Serve ``job_id``'s gateway and proxy in ``directory`` (made root-owned 0711 if missing); returns once
        both listen. The same directory again (adoption after a restart) replaces stale sockets."""
        if not self.started:
            raise RuntimeError("the sealed sandbox's threads are not running (Sealer.start)")
        _own_directory(directory)
        sealed = Sealed(job_id, directory)
        submit = self.recorder.submit

        def refused(refusal: Refusal) -> None:
            if refusal.kind == "model":
                sealed.refused_models.append(refusal.requested_model or "")  # at once: the stop check reads it
            submit(partial(hooks.refusal, refusal))

        self.gateways.add_job(job_id, directory / API_SOCKET, upstream, GatewayCallbacks(
            on_request=lambda record: submit(partial(hooks.request, record)), on_refusal=refused,
            on_activity=lambda _job: hooks.activity()), uid=uid, gid=gid)
        try:
            self.proxies.add_job(job_id, directory / EGRESS_SOCKET, rules,
                                 EgressCallbacks(lambda event: submit(partial(hooks.egress, event))), uid=uid, gid=gid)
        except BaseException:
            self.gateways.remove_job(job_id)
            raise
        return sealed

    def close(self, job_id: str) -> None:
        """Stop the job's gateway and proxy (cutting open connections), remove its sockets, and wait until what
        they reported is recorded. Unknown jobs are fine (closing twice is)."""
        try:
            self.gateways.remove_job(job_id)
        finally:
            self.proxies.remove_job(job_id)
            self.recorder.flush()


def _own_directory(directory: Path) -> None:
    """The socket directory: a real directory (never a symlink), root's, searchable but not listable."""
    directory.mkdir(mode=0o711, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise FileExistsError(f"{directory} is not a directory; refusing to serve sockets there")
    os.chown(directory, os.getuid(), os.getgid())
    os.chmod(directory, 0o711)
