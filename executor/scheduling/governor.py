"""The governor: a hard CPU/memory/pids budget handed out as permits before any container starts.

Owns the arithmetic of the budget. A job may start only with a permit covering its policy's hard
limits; the sum of the permits held plus the executor's own reserve never exceeds the budget, by
construction. A permit remembers what it took, so releasing it can never free more than was reserved.
Admission is strict head-of-line: when the first queued job does not fit, nothing behind it starts
ahead of it, so a big job is never starved by a stream of small ones.

With a shared queue the permit comes first: ``lease`` reserves everything free (capped by the host's
available memory) before the store is asked for a job that fits it, and ``narrow`` keeps of the lease
exactly what the claimed job needs, releasing the rest (the order of temporal's slot suppliers: reserve,
then poll, then mark used).

Must never: start or stop anything, or read the environment.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..policy import Policy
from ..sandbox.disk import free_bytes
from ..settings import Settings, human_size


@dataclass(frozen=True)
class Permit:
    job_id: str
    cpus: float
    memory: int
    pids: int


LEASE = "\0lease"  # the key of the one lease the serving loop holds while it claims
#: Free bytes under the state root below which it is full, whatever ``EXECUTOR_DISK_RESERVE`` says (0 included).
FULL_BELOW = 16 * 2**20


class Governor:
    def __init__(self, budget_cpus: float, budget_memory: int, reserve_memory: int,
                 disk_root: Path | None = None, disk_reserve: int = 0) -> None:
        self.budget_cpus = budget_cpus
        self.budget_memory = budget_memory
        self.reserve_memory = reserve_memory
        self.disk_root, self.disk_reserve = disk_root, disk_reserve
        self._held: dict[str, Permit] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Governor:
        return cls(settings.budget_cpus, settings.budget_memory, settings.reserve_memory, settings.home,
                   settings.disk_reserve)

    @property
    def reserved_cpus(self) -> float:
        return sum(p.cpus for p in self._held.values())

    @property
    def reserved_memory(self) -> int:
        return self.reserve_memory + sum(p.memory for p in self._held.values())

    def why_not(self, policy: Policy) -> str | None:
        """Why a job with this policy cannot start now, or None when it fits."""
        free_cpus = self.budget_cpus - self.reserved_cpus
        free_memory = self.budget_memory - self.reserved_memory
        if policy.cpus > free_cpus + 1e-9:
            return f"needs {policy.cpus:g} cpus, {free_cpus:g} of {self.budget_cpus:g} free"
        if policy.memory > free_memory:
            return (f"needs {policy.memory // 2**20} MiB, {free_memory // 2**20} MiB of "
                    f"{self.budget_memory // 2**20} MiB free")
        return None

    def host_allows(self, policy: Policy) -> str | None:
        """Why the host cannot take the job now: its available memory is below the job's reservation, or the
        free space under the state root is below the disk reserve."""
        available = psutil.virtual_memory().available
        if available < policy.memory:
            return (f"host memory available {available // 2**20} MiB is below the job's reservation "
                    f"{policy.memory // 2**20} MiB")
        short = self.disk_short()
        if short:
            return short
        return None

    def disk_short(self) -> str | None:
        """Why the state root's disk is too full for more writers (below ``EXECUTOR_DISK_RESERVE``, or full
        whatever the reserve: below ``FULL_BELOW``), or None."""
        if self.disk_root is None:
            return None
        free = free_bytes(self.disk_root)
        if free >= max(self.disk_reserve, FULL_BELOW):
            return None
        if free >= self.disk_reserve:
            return (f"the state root's file system is full ({human_size(free)} free): the store, the spool and "
                    "the jobs' files need room there")
        return (f"free disk under the state root is {human_size(free)}, below EXECUTOR_DISK_RESERVE "
                f"{human_size(self.disk_reserve)}")

    def snapshot(self) -> dict:
        with self._lock:
            held = [p for p in self._held.values() if p.job_id != LEASE]
        return {
            "budget": {"cpus": self.budget_cpus, "memory": self.budget_memory,
                       "reserve_memory": self.reserve_memory},
            "reserved": {"cpus": round(sum(p.cpus for p in held), 3),
                         "memory": self.reserve_memory + sum(p.memory for p in held)},
            "permits": [{"job": p.job_id, "cpus": p.cpus, "memory": p.memory, "pids": p.pids} for p in held],
        }

    def try_reserve(self, job_id: str, policy: Policy) -> Permit | None:
        """A permit for the job's limits if they fit now; never waits."""
        with self._lock:
            if job_id in self._held or self.why_not(policy) is not None:
                return None
            permit = Permit(job_id, policy.cpus, policy.memory, policy.pids)
            self._held[job_id] = permit
            return permit

    def lease(self) -> Permit | None:
        """Reserve all that is free now (memory also capped by what the host has available) for a claim;
        None when nothing is free. Never waits."""
        available = psutil.virtual_memory().available
        with self._lock:
            if LEASE in self._held:
                return None
            cpus = self.budget_cpus - self.reserved_cpus
            memory = min(self.budget_memory - self.reserved_memory, available)
            if cpus <= 1e-9 or memory <= 0:
                return None
            permit = Permit(LEASE, cpus, memory, 0)
            self._held[LEASE] = permit
            return permit

    def narrow(self, lease: Permit, job_id: str, policy: Policy) -> Permit:
        """Keep of ``lease`` what the claimed job needs (its policy's limits), release the rest."""
        with self._lock:
            if self._held.get(LEASE) is not lease or policy.cpus > lease.cpus + 1e-9 or policy.memory > lease.memory:
                raise ValueError(f"job {job_id} does not fit the lease it was claimed with")
            del self._held[LEASE]
            permit = Permit(job_id, policy.cpus, policy.memory, policy.pids)
            self._held[job_id] = permit
            return permit

    def release(self, permit: Permit) -> None:
        with self._lock:
            if self._held.get(permit.job_id) is permit:
                del self._held[permit.job_id]
