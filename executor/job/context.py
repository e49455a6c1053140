"""What every job thread needs from the executor, passed down explicitly (no globals).

Owns ``Context``: the settings, the store, the deployment, the runners and their credentials, the shutdown
signal, the watchdogs of running agents (``executor status`` reads their last samples), the sealed
sandbox's sealer, the engine's health, the hooks a settled job fires (notifications) and whether jobs get a
disk image.

The registries are written by job threads and read by the serving loop (and ``status``) at once, so each is
a ``Registry``: every access under its own lock, and whoever iterates gets a snapshot. A plain dict there
let the serving loop die of "dictionary changed size during iteration" while a job started or ended.

Must never: hold mutable state beyond those registries, hand out a live view of one, or be built anywhere
but the serving loop and tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..policy import Runner
from ..redact import Redactor
from ..sandbox.deployment import Deployment
from ..sandbox.health import EngineHealth
from ..sandbox.liveness import Watchdog
from ..sandbox.seal import Sealer
from ..settings import Settings
from ..store import Job, Store

K = TypeVar("K")
V = TypeVar("V")


class Registry(Generic[K, V]):
    """A mapping several threads share: each operation holds the lock; iteration is over ``snapshot()``."""

    def __init__(self) -> None:
        self._items: dict[K, V] = {}
        self._lock = threading.Lock()

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value

    def get(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            return self._items.get(key, default)

    def pop(self, key: K, default: V | None = None) -> V | None:
        with self._lock:
            return self._items.pop(key, default)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def snapshot(self) -> dict[K, V]:
        """A copy taken under the lock: iterate this, never the registry."""
        with self._lock:
            return dict(self._items)


@dataclass
class Context:
    settings: Settings
    store: Store
    sandbox: Deployment
    runners: dict[str, Runner]
    secrets: Mapping[str, str]
    shutdown: threading.Event = field(default_factory=threading.Event)
    #: the watchdog of each job whose agent runs now (status reads their last samples)
    watchdogs: Registry[str, Watchdog] = field(default_factory=Registry)
    pids_reported: Registry[str, int] = field(default_factory=Registry)  # refused forks already in the log
    #: why the serving loop wants a running job stopped (e.g. "disk_reserve"), by job id
    stop_requests: Registry[str, str] = field(default_factory=Registry)
    redactor: Redactor | None = None
    #: told about every job that settled (the notifier, the metrics); each must never block or raise. Filled
    #: by the serving loop before any job thread starts, read-only afterwards.
    listeners: list[Callable[[Job], None]] = field(default_factory=list)
    #: the sealed sandbox's gateways and egress proxies (started by the serving loop)
    sealer: Sealer | None = None
    #: the container engine's health: an attempt's ending is recorded only if the engine answered throughout
    engine: EngineHealth = field(default_factory=EngineHealth)
    #: each job's layers are a disk image of its policy's size (``transaction/jobdisk.py``; set at start-up)
    disk_images: bool = False

    def settled(self, job: Job) -> None:
        """A job settled: tell whoever wants to know."""
        for listener in self.listeners:
            listener(job)
