"""The serving loop's view of itself: what ``status.json`` holds, which ``executor status``, ``show``, the page
and the metrics read.

Owns building that view from the executor's parts (its governor, slots, watchdogs, presence, the engine's and
the store's health, the jobs held unsettled, its runners and the last store counts).

Must never: change anything it reads, or ask the engine (the view is built every tick). ``ex`` is the
serving ``Executor`` (``service.py``, which imports this module).
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from ..clock import utcnow
from ..sandbox.disk import free_bytes
from ..store import Status
from . import faults

#: How many waiting jobs' reasons the status snapshot carries (the queue's head, where reasons matter).
HELD_SHOWN = 500


def build(ex: Any) -> dict:
    """What ``executor status`` shows: budget, reservations, measured use, running jobs, the queue."""
    running = [_running(ex, job_id, slot) for job_id, slot in list(ex.slots.items())]
    with ex._process.oneshot():
        executor_use = {"rss": ex._process.memory_info().rss,
                        "cpu_percent": ex._process.cpu_percent(None)}
    counts, runners = ex._store_view()  # the last answers while the store is away
    machine = faults.machine_view(ex.engine, ex.store_health, ex.unsettled, ex.disk_problem)
    return {
        **ex.governor.snapshot(),
        "ts": time.time(),
        "pid": ex._process.pid,
        "host": ex.settings.host_id,
        "hosts": ex.presence.hosts,
        "poll_interval": ex.settings.poll_interval,  # how fresh a snapshot must be to say "running"
        # Where the engine finds what this executor sees (its container's bind mounts), for `submit` on the host.
        "host_paths": [list(pair) for pair in ex.paths.binds],
        # What `executor submit` judges a job file by: this executor's own settings, not the submitter's.
        "settings": {"home": str(ex.settings.home), "policies": str(ex.settings.policies),
                     "workspace_roots": [str(r) for r in ex.settings.workspace_roots],
                     "budget_cpus": ex.settings.budget_cpus, "budget_memory": ex.settings.budget_memory,
                     "reserve_memory": ex.settings.reserve_memory},
        "measured": {
            "executor": executor_use,
            "jobs": {"cpu_cores": round(sum(r["cpu_cores"] or 0 for r in running), 4),
                     "memory": sum(r["memory_used"] or 0 for r in running)},
            "host": {"memory_available": psutil.virtual_memory().available},
            "disk": {"state_root_free": free_bytes(ex.settings.home), "reserve": ex.settings.disk_reserve,
                     "jobs": sum(r["disk_used"] or 0 for r in running),
                     "cap": ex.disk.mode if ex.disk else None},
        },
        "running": running,
        "queue_length": counts.get(Status.queued, 0),
        "counts": {st.value: n for st, n in counts.items()},
        "waiting": ex.waiting,
        # Why queued jobs wait, for `show` and the page: the first HELD_SHOWN in admission order.
        "held": dict(list(ex.held.items())[:HELD_SHOWN]),
        "runners": runners,
        **machine,  # the engine, the store, the jobs held unsettled; configuration the loop could not take:
        "problems": [p for p in (ex.runners_file.problem,) if p] + machine["problems"],
    }


def _running(ex: Any, job_id: str, slot) -> dict:
    watchdog = ex.ctx.watchdogs.get(job_id)
    beat = watchdog.last_beat if watchdog else None
    return {
        "job": job_id, "runner": slot.job.runner, "cpus": slot.permit.cpus, "memory": slot.permit.memory,
        "pids": slot.permit.pids,
        "cpu_cores": beat.cpu_cores if beat else None, "memory_used": beat.memory if beat else None,
        "state": beat.state if beat else None, "idle_for": beat.idle_for if beat else None,
        "last_activity": watchdog.last_activity if watchdog else None,
        "disk_used": watchdog.disk.bytes if watchdog and watchdog.disk else None,
        "disk_limit": slot.job.policy.get("disk"),
    }


def runners(ex: Any) -> list[dict]:
    """Each runner's state: ok, or cooling down until T; how many of its jobs run and wait."""
    now = utcnow()
    states = ex.store.runner_states()
    waiting = ex.store.jobs([Status.waiting_retry])
    view = []
    for name in sorted(ex.ctx.runners):
        until = states[name].cooldown_until if name in states else None
        cooling = until is not None and until > now
        view.append({
            "runner": name,
            "state": f"cooling down until {until:%Y-%m-%dT%H:%M:%SZ}" if cooling else "ok",
            "cooldown_until": until.isoformat() if cooling else None,
            "reason": states[name].reason if cooling else None,
            "running": sum(1 for slot in ex.slots.values() if slot.job.runner == name),
            "waiting": sum(1 for job in waiting if job.runner == name),
        })
    return view
