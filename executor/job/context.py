"""What every job thread needs from the executor, passed down explicitly (no globals).

Owns ``Context``: the settings, the store, the deployment, the runners and their credentials, the shutdown
signal, the watchdogs of running agents (``executor status`` reads their last samples), the sealed
sandbox's sealer, the hooks a settled job fires (notifications) and whether jobs get a disk image.

Must never: hold mutable state beyond those registries, or be built anywhere but the serving loop and
tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..policy import Runner
from ..redact import Redactor
from ..sandbox.deployment import Deployment
from ..sandbox.liveness import Watchdog
from ..sandbox.seal import Sealer
from ..settings import Settings
from ..store import Job, Store


@dataclass
class Context:
    settings: Settings
    store: Store
    sandbox: Deployment
    runners: dict[str, Runner]
    secrets: Mapping[str, str]
    shutdown: threading.Event = field(default_factory=threading.Event)
    #: the watchdog of each job whose agent runs now (status reads their last samples)
    watchdogs: dict[str, Watchdog] = field(default_factory=dict)
    pids_reported: dict[str, int] = field(default_factory=dict)  # refused forks already in the log
    #: why the serving loop wants a running job stopped (e.g. "disk_reserve"), by job id
    stop_requests: dict[str, str] = field(default_factory=dict)
    redactor: Redactor | None = None
    #: told about every job that settled (the notifier, the metrics); each must never block or raise
    listeners: list[Callable[[Job], None]] = field(default_factory=list)
    #: the sealed sandbox's gateways and egress proxies (started by the serving loop)
    sealer: Sealer | None = None
    #: each job's layers are a disk image of its policy's size (``transaction/jobdisk.py``; set at start-up)
    disk_images: bool = False

    def settled(self, job: Job) -> None:
        """A job settled: tell whoever wants to know."""
        for listener in self.listeners:
            listener(job)
