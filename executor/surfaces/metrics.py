"""The Prometheus text endpoint: the report's counters and gauges for a scraper (e.g. Grafana on a home server).

Owns one private ``prometheus_client`` registry (never the process-wide default one) holding a collector
whose values are a snapshot the serving loop refreshes each tick: one aggregate SQL query over the store
(jobs by status/reason/runner, rate-limit events by runner/kind, token and cost sums) plus the status
snapshot the loop already computed (budget, reservations, measured use, queue, and every host sharing the
store: its budget, what it holds, when it was last seen). A scrape only reads that snapshot, so it never
touches the database.

Must never: listen anywhere but the configured address (loopback by default), be started when
``EXECUTOR_METRICS_PORT`` is unset, expose a prompt, a path's content or a credential (labels are
statuses, reasons, runner names and rate-limit kinds only), or raise into the serving loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import text

from ..errors import ConfigError
from ..store import TERMINAL, Status, Store

log = logging.getLogger(__name__)

#: One statement, three aggregates (a scan of each table, no per-job work in Python). The first branch
#: types its NULLs: PostgreSQL matches a UNION's column types from it.
AGGREGATE = text("""
    SELECT 'job' AS kind, status AS a, COALESCE(reason, '') AS b, runner AS c, COUNT(*) AS n,
           CAST(NULL AS DOUBLE PRECISION) AS x, CAST(NULL AS DOUBLE PRECISION) AS y,
           CAST(NULL AS DOUBLE PRECISION) AS z
      FROM job GROUP BY status, reason, runner
    UNION ALL
    SELECT 'rate_limit', runner, kind, NULL, COUNT(*), SUM(COALESCE(retry_delay, 0)), NULL, NULL
      FROM ratelimitevent GROUP BY runner, kind
    UNION ALL
    SELECT 'usage', NULL, NULL, NULL, COUNT(*), SUM(COALESCE(input_tokens, 0)),
           SUM(COALESCE(output_tokens, 0)), SUM(COALESCE(cost_usd, 0))
      FROM attempt
""")

_TERMINAL = {st.value for st in TERMINAL}


def aggregate(store: Store) -> dict[str, Any]:
    """The store's counters in one query."""
    jobs: list[tuple[str, str, str, int]] = []
    limits: list[tuple[str, str, int, float]] = []
    usage = {"attempts": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
    with store.engine.connect() as conn:
        for kind, a, b, c, n, x, y, z in conn.execute(AGGREGATE):
            if kind == "job":
                # SQLAlchemy stores the enum by name, which is also its value
                jobs.append((Status[a].value if a in Status.__members__ else str(a), b, c, int(n)))
            elif kind == "rate_limit":
                limits.append((a, b, int(n), float(x or 0)))
            else:
                usage = {"attempts": int(n or 0), "input_tokens": int(x or 0), "output_tokens": int(y or 0),
                         "cost_usd": float(z or 0)}
    return {"jobs": jobs, "rate_limits": limits, "usage": usage}


class ExecutorMetrics:
    """The collector of the executor's registry; ``refresh`` replaces its snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"jobs": [], "rate_limits": [], "usage": {}}
        self._status: dict[str, Any] = {}
        self._server: Any = None
        self.registry.register(self)

    def refresh(self, store: Store, status: dict[str, Any] | None = None) -> None:
        """Re-read the store's aggregates and take the loop's status snapshot; never raises."""
        try:
            data = aggregate(store)
        except Exception:  # noqa: BLE001 - a metrics failure must not stop the serving loop
            log.exception("metrics refresh failed", extra={"action": "metrics"})
            return
        with self._lock:
            self._data = data
            if status is not None:
                self._status = status

    # -- exposition ------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        with self._lock:
            data, status = self._data, self._status
        finished = CounterMetricFamily("executor_jobs_finished", "Jobs that reached a terminal status.",
                                       labels=["status", "reason", "runner"])
        current = GaugeMetricFamily("executor_jobs", "Jobs in each status now.", labels=["status", "runner"])
        per_status: dict[tuple[str, str], int] = {}
        for st, reason, runner, n in data["jobs"]:
            if st in _TERMINAL:
                finished.add_metric([st, reason, runner], n)
            per_status[(st, runner)] = per_status.get((st, runner), 0) + n
        for (st, runner), n in sorted(per_status.items()):
            current.add_metric([st, runner], n)
        yield finished
        yield current

        limits = CounterMetricFamily("executor_rate_limit_events", "Rate limits and overloads met by a runner.",
                                     labels=["runner", "kind"])
        waited = CounterMetricFamily("executor_rate_limit_wait_seconds",
                                     "Seconds jobs waited after a rate limit before their next attempt.",
                                     labels=["runner"])
        waits: dict[str, float] = {}
        for runner, kind, n, delay in data["rate_limits"]:
            limits.add_metric([runner, kind], n)
            waits[runner] = waits.get(runner, 0.0) + delay
        for runner, seconds in sorted(waits.items()):
            waited.add_metric([runner], seconds)
        yield limits
        yield waited

        usage = data["usage"]
        tokens = CounterMetricFamily("executor_tokens", "Tokens from the CLI's result lines.", labels=["direction"])
        tokens.add_metric(["input"], usage.get("input_tokens", 0))
        tokens.add_metric(["output"], usage.get("output_tokens", 0))
        yield tokens
        yield CounterMetricFamily("executor_cost_usd", "Cost in USD from the CLI's result lines.",
                                  value=usage.get("cost_usd", 0.0))
        yield CounterMetricFamily("executor_attempts", "Attempts started.", value=usage.get("attempts", 0))

        if not status:
            return
        budget = status.get("budget") or {}
        reserved = status.get("reserved") or {}
        measured = status.get("measured") or {}
        gauges = {
            "executor_running_jobs": ("Jobs holding a slot now.", len(status.get("running") or [])),
            "executor_queue_length": ("Queued jobs.", status.get("queue_length")),
            "executor_budget_cpus": ("CPU cores all jobs may use together.", budget.get("cpus")),
            "executor_budget_memory_bytes": ("Memory budget.", budget.get("memory")),
            "executor_reserve_memory_bytes": ("Part of the memory budget kept for the executor.",
                                              budget.get("reserve_memory")),
            "executor_reserved_cpus": ("CPU cores reserved by running jobs.", reserved.get("cpus")),
            "executor_reserved_memory_bytes": ("Memory reserved (executor reserve + running jobs).",
                                               reserved.get("memory")),
            "executor_rss_bytes": ("The executor process's resident memory.",
                                   (measured.get("executor") or {}).get("rss")),
            "executor_cpu_percent": ("The executor process's CPU use (percent of one core).",
                                     (measured.get("executor") or {}).get("cpu_percent")),
            "executor_jobs_cpu_cores": ("CPU cores the running jobs use (measured).",
                                        (measured.get("jobs") or {}).get("cpu_cores")),
            "executor_jobs_memory_bytes": ("Memory the running jobs use (measured).",
                                           (measured.get("jobs") or {}).get("memory")),
        }
        for name, (doc, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        cooling = GaugeMetricFamily("executor_runner_cooling_down", "1 while a runner rests after a rate limit.",
                                    labels=["runner"])
        for r in status.get("runners") or []:
            cooling.add_metric([r["runner"]], 0.0 if r.get("state") == "ok" else 1.0)
        yield cooling
        yield from _host_gauges(status.get("hosts") or [])

    # -- serving ---------------------------------------------------------------------------------------

    def start(self, port: int, host: str = "127.0.0.1") -> None:
        self._server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics endpoint serving", extra={"action": "metrics", "addr": f"{host}:{port}"})

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _host_gauges(hosts: list[dict]) -> Iterator[Any]:
    """Every host sharing the store, as the serving loop's last heartbeat saw it."""
    families = {
        "up": ("executor_host_up", "1 while a host beats (0: stopped or lost)."),
        "seen": ("executor_host_last_seen_seconds", "Seconds since a host's last heartbeat."),
        "running": ("executor_host_running_jobs", "Jobs a host runs now."),
        "budget_cpus": ("executor_host_budget_cpus", "A host's CPU budget."),
        "reserved_cpus": ("executor_host_reserved_cpus", "CPU cores a host's running jobs reserve."),
        "budget_memory": ("executor_host_budget_memory_bytes", "A host's memory budget."),
        "reserved_memory": ("executor_host_reserved_memory_bytes", "Memory a host reserves (its reserve + jobs)."),
    }
    gauges = {key: GaugeMetricFamily(name, doc, labels=["host"]) for key, (name, doc) in families.items()}
    for h in hosts:
        label = [h["host"]]
        gauges["up"].add_metric(label, 1.0 if h["state"] == "alive" else 0.0)
        gauges["seen"].add_metric(label, float(h["last_seen_seconds"]))
        gauges["running"].add_metric(label, float(h["running"]))
        gauges["budget_cpus"].add_metric(label, float(h["budget"]["cpus"]))
        gauges["reserved_cpus"].add_metric(label, float(h["reserved"]["cpus"]))
        gauges["budget_memory"].add_metric(label, float(h["budget"]["memory"]))
        gauges["reserved_memory"].add_metric(label, float(h["reserved"]["memory"]))
    yield from gauges.values()


def serve_metrics(settings: Any, store: Store) -> ExecutorMetrics | None:
    """The started endpoint when ``settings.metrics_port`` is set, else None."""
    port = getattr(settings, "metrics_port", None)
    if port is None:
        return None
    metrics = ExecutorMetrics()
    metrics.refresh(store)
    host = getattr(settings, "metrics_host", "127.0.0.1")
    try:
        metrics.start(port, host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port} (EXECUTOR_METRICS_PORT): {exc}") from None
    return metrics
