"""The hosts that share the store: their rows, their heartbeats, and finding the ones that were lost.

Owns the host table's queries. Each ``executor serve`` registers its row at start (budget, workspace roots
with the storage each is, version), beats every ``EXECUTOR_HOST_HEARTBEAT`` seconds with what it holds
(permits, running jobs, why its queue waits), and marks itself stopped on a clean shutdown. Liveness is judged by the database's clock
on PostgreSQL (hosts' clocks may drift apart): a host whose last heartbeat is older than
``EXECUTOR_HOST_TIMEOUT`` is lost, and its running, testing, committing and waiting jobs are marked
interrupted, which ``queue.py``'s take-over and the host's own recovery act on.

Must never: move a job's status (marking only sets ``interrupted_at``), or judge a host lost by a clock
other than the one its heartbeat was written with.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlmodel import col

from ..clock import aware, utcnow
from .models import Host, Job
from .queue import MARKED, Roots, on_roots, under_roots
from .status import Status


class HostQueries:
    """Mixed into ``Store``: host rows and heartbeats."""

    postgres: bool
    session: Any
    _db_now: Any
    _db_cutoff: Any

    def db_now(self) -> datetime:
        """Now by the clock heartbeats are written with (the database's on PostgreSQL)."""
        if not self.postgres:
            return utcnow()
        with self.session() as s:
            return aware(s.execute(text("SELECT now()")).scalar_one())

    def register_host(self, host: Host) -> Host:
        """Insert or refresh this host's row at start: alive now, not stopped, not lost."""
        with self.session() as s:
            row = s.get(Host, host.id) or Host(id=host.id, version=host.version, budget_cpus=host.budget_cpus,
                                                budget_memory=host.budget_memory, reserve_memory=host.reserve_memory)
            for name in ("version", "machine", "pid", "budget_cpus", "budget_memory", "reserve_memory",
                         "workspace_roots", "storage"):
                setattr(row, name, getattr(host, name))
            row.started_at = utcnow()
            row.stopped_at = row.lost_at = None
            row.reserved_cpus, row.reserved_memory, row.running, row.waiting = 0.0, host.reserve_memory, 0, None
            s.add(row)
            s.flush()
            s.execute(update(Host).where(col(Host.id) == host.id).values(last_seen=self._db_now()))
            s.commit()
            s.refresh(row)
            return row

    def beat(self, host_id: str, reserved_cpus: float, reserved_memory: int, running: int,
             waiting: str | None) -> None:
        """This host is alive and holds this much (a lost host that beats again is no longer lost)."""
        with self.session() as s:
            s.execute(update(Host).where(col(Host.id) == host_id).values(
                last_seen=self._db_now(), lost_at=None, reserved_cpus=reserved_cpus, reserved_memory=reserved_memory,
                running=running, waiting=waiting))
            s.commit()

    def stop_host(self, host_id: str) -> None:
        with self.session() as s:
            s.execute(update(Host).where(col(Host.id) == host_id).values(
                stopped_at=utcnow(), last_seen=self._db_now(), reserved_cpus=0.0, running=0, waiting=None))
            s.commit()

    def hosts(self) -> list[Host]:
        with self.session() as s:
            rows = list(s.execute(select(Host).order_by(col(Host.id))).scalars())
        for row in rows:
            for name in ("started_at", "last_seen", "stopped_at", "lost_at"):
                value = getattr(row, name)
                if value is not None:
                    setattr(row, name, aware(value))
        return rows

    def mark_lost(self, timeout: float) -> tuple[list[str], list[tuple[str, str]]]:
        """Find the hosts silent for longer than ``timeout`` and mark their jobs interrupted; returns the
        hosts newly found lost and the (job, host) pairs newly marked."""
        cutoff = self._db_cutoff(timeout)
        stale = select(Host.id).where(col(Host.last_seen) < cutoff)
        with self.session() as s:
            lost = list(s.execute(update(Host).where(col(Host.last_seen) < cutoff, col(Host.lost_at).is_(None),
                                                     col(Host.stopped_at).is_(None))
                                  .values(lost_at=self._db_now()).returning(Host.id)).scalars())
            marked = [(job_id, host_id) for job_id, host_id in s.execute(
                update(Job).where(col(Job.host_id).in_(stale), col(Job.status).in_([st.name for st in MARKED]),
                                  col(Job.interrupted_at).is_(None))
                .values(interrupted_at=self._db_now()).returning(Job.id, Job.host_id)
                .execution_options(synchronize_session=False))]
            s.commit()
        return lost, marked

    def reclaim(self, host_id: str) -> list[str]:
        """Back after a crash: this host's jobs are its own again (their interruption mark is cleared)."""
        with self.session() as s:
            ids = list(s.execute(update(Job).where(col(Job.host_id) == host_id, col(Job.interrupted_at).is_not(None))
                                 .values(interrupted_at=None).returning(Job.id)
                                 .execution_options(synchronize_session=False)).scalars())
            s.commit()
        return ids

    def adopt_unowned(self, host_id: str, roots: Roots) -> list[str]:
        """Jobs mid-flight from before hosts existed (no host recorded) under this host's roots become its."""
        from .queue import HOLDING

        with self.session() as s:
            ids = list(s.execute(update(Job).where(col(Job.host_id).is_(None),
                                                   col(Job.status).in_([st.name for st in HOLDING]),
                                                   on_roots(Job, roots))
                                 .values(host_id=host_id).returning(Job.id)
                                 .execution_options(synchronize_session=False)).scalars())
            s.commit()
        return ids

    def stamp_storage(self, host_id: str, storage: Mapping[str, str]) -> int:
        """Queued jobs this host's spool took in before storage was recorded get the storage of the root they
        lie under (the deepest root first); returns how many."""
        stamped = 0
        with self.session() as s:
            for root in sorted(storage, key=len, reverse=True):
                stamped += s.execute(update(Job).where(
                    col(Job.status) == Status.queued, col(Job.storage).is_(None), col(Job.spool_host) == host_id,
                    under_roots(col(Job.workspace), [root])).values(storage=storage[root])
                    .execution_options(synchronize_session=False)).rowcount or 0
            s.commit()
        return stamped
