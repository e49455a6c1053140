"""The Prometheus text endpoint: the report's counters and gauges for a scraper (e.g. Grafana on a home server).

Owns one private ``prometheus_client`` registry (never the process-wide default one) holding a collector
whose values are a snapshot the serving loop refreshes each tick: the store's counters, one aggregate query
(``store/aggregates.py``: jobs by status/reason/runner, rate-limit events by runner/kind, token and cost
sums, sealed jobs' API requests by runner/status with the API's token counts, egress decisions) plus the
status snapshot the loop already computed (budget, reservations, measured use, queue, each running job's
disk, the container engine's and the store's health and the jobs held unsettled, and every host sharing the
store: its budget, what it holds, when it was last seen). A scrape only reads that snapshot, so it never
touches the database. Durations and waits are histograms in seconds observed as jobs settle; the process
collector gives the executor's own CPU seconds and memory.

Must never: query the database itself, listen anywhere but the configured address (loopback by default),
be started when ``EXECUTOR_METRICS_PORT`` is unset, expose a prompt, a path's content or a credential
(labels are statuses, reasons, runner names, rate-limit kinds and the ids of running jobs only), or raise
into the serving loop.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..clock import aware
from ..errors import ConfigError
from ..store import TERMINAL, Store

log = logging.getLogger(__name__)

_TERMINAL = {st.value for st in TERMINAL}

#: Seconds: a job runs from seconds (a rejected or trivial one) to hours; so does its wait in the queue.
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))


class ExecutorMetrics:
    """The collector of the executor's registry; ``refresh`` replaces its snapshot. Beside it the registry
    holds the standard process and platform collectors, the build info, and what the loop observes as it
    happens (job duration and queue wait histograms, rejected spool files)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"jobs": [], "rate_limits": [], "usage": {}, "api": [], "egress": {}}
        self._status: dict[str, Any] = {}
        self._server: Any = None
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("executor_build", "The executor's version.", registry=self.registry).info(
            {"version": _version()})
        self.duration = Histogram("executor_job_duration_seconds", "From a job's first start to its end.",
                                  ["status"], buckets=BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("executor_job_queue_wait_seconds", "From a job's arrival to its first start.",
                                    buckets=BUCKETS, registry=self.registry)
        self.rejected = Counter("executor_spool_rejected_files", "Job files the spool refused.",
                                registry=self.registry)

    def job_settled(self, job: Any) -> None:
        """Observe a job that reached a terminal status (its duration and its wait in the queue)."""
        if not job.status.terminal or job.started_at is None:
            return
        started = aware(job.started_at)
        if job.finished_at is not None:
            self.duration.labels(job.status.value).observe((aware(job.finished_at) - started).total_seconds())
        self.queue_wait.observe(max(0.0, (started - aware(job.created_at)).total_seconds()))

    def refresh(self, store: Store, status: dict[str, Any] | None = None) -> None:
        """Re-read the store's aggregates and take the loop's status snapshot; never raises."""
        try:
            data = store.metric_counters()
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
        yield from self._sealed(data)

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
            "executor_reserved_cpus_ratio": ("Share of the CPU budget reserved by running jobs.",
                                             _ratio(reserved.get("cpus"), budget.get("cpus"))),
            "executor_reserved_memory_ratio": ("Share of the memory budget reserved (reserve + running jobs).",
                                               _ratio(reserved.get("memory"), budget.get("memory"))),
            "executor_disk_free_bytes": ("Free space under the state root.",
                                         (measured.get("disk") or {}).get("state_root_free")),
            "executor_disk_reserve_bytes": ("Free space under the state root no job may take.",
                                            (measured.get("disk") or {}).get("reserve")),
            "executor_jobs_cpu_cores": ("CPU cores the running jobs use (measured).",
                                        (measured.get("jobs") or {}).get("cpu_cores")),
            "executor_jobs_memory_bytes": ("Memory the running jobs use (measured).",
                                           (measured.get("jobs") or {}).get("memory")),
        }
        engine, store = status.get("engine") or {}, status.get("store") or {}
        gauges.update({
            "executor_engine_up": ("1 while the container engine answers (0: no job starts, running ones wait).",
                                   None if not engine else float(engine.get("state") == "reachable")),
            "executor_engine_outages": ("Times the container engine went away since the executor started.",
                                        engine.get("outages")),
            "executor_store_up": ("1 while the store answers the serving loop (0: claims and intake pause).",
                                  None if not store else float(store.get("state") == "ok")),
            "executor_unsettled_jobs": ("Jobs this host holds until it can settle them (the engine or the store "
                                        "failed under them).", len(status.get("unsettled") or [])),
        })
        for name, (doc, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        disk = GaugeMetricFamily("executor_job_disk_bytes", "What each running job holds on its disk (its "
                                 "layers), measured.", labels=["job"])
        limit = GaugeMetricFamily("executor_job_disk_limit_bytes", "Each running job's disk cap.", labels=["job"])
        for r in status.get("running") or []:
            if r.get("disk_used") is not None:
                disk.add_metric([r["job"]], r["disk_used"])
            if r.get("disk_limit") is not None:
                limit.add_metric([r["job"]], r["disk_limit"])
        yield disk
        yield limit
        cooling = GaugeMetricFamily("executor_runner_cooling_down", "1 while a runner rests after a rate limit.",
                                    labels=["runner"])
        for r in status.get("runners") or []:
            cooling.add_metric([r["runner"]], 0.0 if r.get("state") == "ok" else 1.0)
        yield cooling
        yield from _host_gauges(status.get("hosts") or [])

    @staticmethod
    def _sealed(data: dict[str, Any]) -> Iterator[Any]:
        """The sealed jobs' gateways and egress proxies: requests and usage as the API reported them, and egress
        decisions."""
        requests = CounterMetricFamily("executor_api_requests", "API requests sealed jobs' gateways forwarded.",
                                       labels=["runner", "status"])
        tokens = CounterMetricFamily("executor_api_tokens", "Tokens as the API reported them to the gateways.",
                                     labels=["kind"])
        sums: dict[str, int] = {"input": 0, "output": 0, "cache_read": 0, "cache_creation": 0}
        for runner, status, n, counts in data.get("api", []):
            requests.add_metric([runner, status], n)
            for key, value in counts.items():
                sums[key] += value
        for key, value in sums.items():
            tokens.add_metric([key], value)
        egress = CounterMetricFamily("executor_egress_decisions", "Egress requests of sealed jobs, by decision.",
                                     labels=["decision"])
        for decision in ("allowed", "denied"):
            egress.add_metric([decision], data.get("egress", {}).get(decision, 0))
        yield requests
        yield tokens
        yield egress

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


def _ratio(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def _version() -> str:
    try:
        return importlib.metadata.version("executor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
