"""What people see of a job's seal: its network (sealed, or an unsealed opt-in flagged as such), the egress
requests its proxy denied, and the API requests its gateway forwarded with the usage the API reported. An
egress or ``gateway_refused`` event stands for ``count`` identical ones (``sandbox/journal.py``).

Owns the wording of the "unsealed" flag and the shapes ``executor show``, its ``--json`` and the review page
share, so the three say the same thing.

Must never: write to the store, or show more of an egress event than where it went and why it was refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the store loads when a command opens it (SQLAlchemy is slow to import)
    from ..store import Job

#: The event kinds these views read (``executor show`` fetches only these).
SEAL_EVENTS = ("egress", "gateway_refused", "sealed_events_capped")

#: Policies that leave the sandbox open: the container holds the real credential and has a route out.
UNSEALED = ("bridge", "host")


def network_view(job: Job) -> dict[str, Any]:
    network = (job.policy or {}).get("network", "sealed")
    view: dict[str, Any] = {"network": network, "sealed": network == "sealed", "unsealed": network in UNSEALED}
    if network in UNSEALED:
        view["warning"] = (f"UNSEALED: network {network!r} (an explicit opt-in of policy {job.policy_name!r}): the "
                           "agent's container held the runner's real credential and had an open route out; "
                           "nothing it sent was checked or recorded")
    elif network == "sealed":
        view["egress"] = list((job.policy or {}).get("egress") or [])
    return view


def egress_denials(events: list) -> list[dict[str, Any]]:
    """The egress requests a job's proxy refused, oldest first (``events``: the job's events, in order)."""
    return [{"ts": e.ts.isoformat(), "attempt": e.attempt, "method": e.data.get("method"),
             "host": e.data.get("host"), "port": e.data.get("port"), "status": e.data.get("status"),
             "reason": e.data.get("reason"), "count": e.data.get("count", 1)}
            for e in events if e.kind == "egress" and e.data.get("decision") == "denied"]


def api_view(rows: list, events: list) -> dict[str, Any]:
    """A job's API requests as its gateway saw them (``rows``): how many, their statuses, the usage the API
    reported, and what the gateway refused (from ``events``)."""
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row.status)] = statuses.get(str(row.status), 0) + 1
    return {
        "requests": len(rows),
        "statuses": dict(sorted(statuses.items())),
        "models": sorted({row.model for row in rows if row.model}),
        "input_tokens": sum(row.input_tokens or 0 for row in rows),
        "output_tokens": sum(row.output_tokens or 0 for row in rows),
        "cache_creation_input_tokens": sum(row.cache_creation_input_tokens or 0 for row in rows),
        "cache_read_input_tokens": sum(row.cache_read_input_tokens or 0 for row in rows),
        "refused": [e.data for e in events if e.kind == "gateway_refused"],
        # refusals and egress decisions past the job's event cap, counted only (by kind)
        "unrecorded": next((e.data.get("unrecorded", {}) for e in events if e.kind == "sealed_events_capped"), {}),
    }


def denial_line(denial: dict[str, Any]) -> str:
    times = f" ({denial['count']} times)" if denial.get("count", 1) > 1 else ""
    return f"{denial['method']} {denial['host']}:{denial['port']} -> {denial['status']}: {denial['reason']}{times}"
