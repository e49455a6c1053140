"""Tests for executor.report (figures, percentiles, 24 h windows, the empty store, the footprint) and the
metrics collector of executor.metrics, against a real store filled with hand-written rows (the store's
tests on both engines: a SQLite file and a PostgreSQL database).

The same figures from real runs are checked in tests/integration/test_report_runs.py."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from executor.store import ApiRequest, Attempt, Event, Job, RateLimitEvent, Status, Store
from executor.surfaces.metrics import ExecutorMetrics
from executor.surfaces.report import BUSY_WINDOW_JOBS, build_report, percentile, read_footprint, render_text

NOW = datetime(2025, 6, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(db_url: str):
    s = Store(db_url)
    yield s
    s.close()


def add(store: Store, job_id: str, status: Status, *, finished: datetime | None, started_after: float = 10.0,
        took: float = 60.0, runner: str = "scripted", reason: str | None = None, models: list | None = None,
        usage: tuple[int, int, float] | None = None) -> Job:
    finished_at = finished
    started_at = finished_at - timedelta(seconds=took) if finished_at else None
    created_at = (started_at or NOW) - timedelta(seconds=started_after)
    job = Job(id=job_id, session_id=job_id, runner=runner, model_requested="claude-sonnet-4-5", workspace="/r",
              prompt="p", policy_name="default", policy={}, status=status, reason=reason, created_at=created_at,
              started_at=started_at, finished_at=finished_at, models_seen=models or [])
    store.add_job(job)
    if usage is not None:
        with store.session() as s:
            s.add(Attempt(job_id=job_id, number=1, started_at=started_at or created_at, finished_at=finished_at,
                          input_tokens=usage[0], output_tokens=usage[1], cost_usd=usage[2]))
            s.commit()
    return job


def limit(store: Store, job_id: str, ts: datetime, runner: str = "scripted", delay: float | None = 2.0,
          kind: str = "rate_limited") -> None:
    store.add_rate_limit(RateLimitEvent(runner=runner, job_id=job_id, attempt=1, ts=ts, kind=kind,
                                        status_code=429, retry_delay=delay))


# -- percentiles -------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of input does not matter


def test_percentile_of_one_and_of_none():
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


# -- the empty store --------------------------------------------------------------------------------------


def test_empty_store_reports_zeros_and_no_rates(store):
    report = build_report(store, timedelta(days=7), now=NOW)
    assert report["jobs"]["finished"] == 0
    assert set(report["jobs"]["by_status"].values()) == {0}
    assert report["completion_rate"] is None
    assert report["rate_limits"]["events"] == 0 and report["rate_limits"]["per_24h"] == 0
    assert report["rate_limits"]["mean_wait_seconds"] is None and report["rate_limits"]["busy_windows"] == []
    assert report["duration_seconds"]["p50"] is None and report["queue_wait_seconds"]["p95"] is None
    assert report["usage"] == {"attempts": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0}
    assert report["runners"] == {}
    assert report["footprint"]["executor"] == "not running"
    text = render_text(report)
    assert "finished     0 jobs: none" in text and "executor not running" in text
    json.dumps(report)  # plain JSON data


# -- figures -----------------------------------------------------------------------------------------------


def test_outcomes_rates_rollbacks_timeouts_and_usage(store):
    t = NOW - timedelta(hours=1)
    for i in range(3):
        add(store, f"ok{i}", Status.succeeded, finished=t, took=60 * (i + 1), started_after=5 * (i + 1),
            reason="committed", models=["claude-sonnet-4-5"], usage=(100, 10, 0.01))
    add(store, "tests", Status.rolled_back, finished=t, reason="tests_failed", models=["claude-sonnet-4-5"],
        usage=(50, 5, 0.005))
    add(store, "agent", Status.rolled_back, finished=t, reason="agent_error", runner="haiku",
        models=["claude-haiku-4-5"])
    add(store, "slow", Status.failed, finished=t, reason="timeout", runner="haiku")
    add(store, "slowtests", Status.rolled_back, finished=t, reason="tests_timeout")
    add(store, "stuck", Status.stalled, finished=t, reason="stalled")
    add(store, "old", Status.succeeded, finished=NOW - timedelta(days=9), reason="committed")  # out of the window
    add(store, "waiting", Status.queued, finished=None)
    stuck = store.get("stuck")
    store.add_event(stuck, 1, "state", {"status": "queued", "reason": "stalled"})  # re-queued once before
    store.add_event(stuck, 2, "state", {"status": "stalled", "reason": "stalled"})
    for delay in (1.0, 2.0, None):
        limit(store, "ok0", t, delay=delay)
    limit(store, "agent", t, runner="haiku", kind="overloaded", delay=3.0)
    limit(store, "old", NOW - timedelta(days=9))  # out of the window

    report = build_report(store, timedelta(days=7), now=NOW)
    jobs = report["jobs"]
    assert jobs["finished"] == 8
    assert jobs["by_status"] == {"succeeded": 3, "rolled_back": 3, "failed": 1, "cancelled": 0, "stalled": 1}
    assert jobs["active"] == {"queued": 1}
    assert report["completion_rate"] == round(3 / 8, 4)
    assert report["rollbacks"] == {"total": 3, "tests_failed": 2, "agent_error": 1,
                                   "by_reason": {"agent_error": 1, "tests_failed": 1, "tests_timeout": 1}}
    assert report["timeouts"] == {"agent": 1, "tests": 1, "total": 2}
    assert report["stalls"]["jobs_stalled"] == 1
    rl = report["rate_limits"]
    assert rl["events"] == 4 and rl["by_kind"] == {"overloaded": 1, "rate_limited": 3}
    assert rl["per_24h"] == round(4 / 7, 3)
    assert rl["mean_wait_seconds"] == 2.0 and rl["waits_recorded"] == 3
    assert report["runners"]["scripted"]["jobs"] == 6 and report["runners"]["haiku"]["jobs"] == 2
    assert report["runners"]["scripted"]["models"] == ["claude-sonnet-4-5"]
    assert report["runners"]["haiku"]["models"] == ["claude-haiku-4-5"]
    assert report["runners"]["haiku"]["rate_limit_events"] == 1
    assert report["usage"] == {"attempts": 4, "input_tokens": 350, "output_tokens": 35, "cost_usd": 0.035}
    durations = report["duration_seconds"]
    assert durations["count"] == 8
    assert durations["p50"] == 60.0 and durations["max"] == 180.0
    waits = report["queue_wait_seconds"]
    assert waits["max"] == 15.0 and waits["p50"] == 10.0
    text = render_text(report)
    assert "completion   37.5% (3/8 succeeded)" in text
    assert "rollbacks    3: 2 tests failed, 1 agent error" in text


def test_stall_events_in_the_window_are_counted(store):
    job = add(store, "stuck", Status.stalled, finished=datetime.now(timezone.utc) - timedelta(minutes=5),
              reason="stalled")
    store.add_event(job, 1, "state", {"status": "queued", "reason": "stalled"})
    store.add_event(job, 2, "state", {"status": "stalled", "reason": "stalled"})
    store.add_event(job, 2, "state", {"status": "running"})
    report = build_report(store, timedelta(days=1))  # events are stamped with the real clock
    assert report["stalls"] == {"events": 2, "jobs_stalled": 1}


def test_rate_limits_in_busy_24h_windows(store):
    # window 0 (the last 24 h): 51 jobs and 3 rate limits; window 2: 50 jobs (not busy) and 5 rate limits
    for i in range(BUSY_WINDOW_JOBS + 1):
        add(store, f"busy{i}", Status.succeeded, finished=NOW - timedelta(hours=2, seconds=i))
    for i in range(BUSY_WINDOW_JOBS):
        add(store, f"calm{i}", Status.succeeded, finished=NOW - timedelta(days=2, hours=3, seconds=i))
    for _ in range(3):
        limit(store, "busy0", NOW - timedelta(hours=5))
    for _ in range(5):
        limit(store, "calm0", NOW - timedelta(days=2, hours=1))
    report = build_report(store, timedelta(days=7), now=NOW)
    rl = report["rate_limits"]
    assert rl["events"] == 8 and rl["per_24h"] == round(8 / 7, 3)
    assert len(rl["busy_windows"]) == 1
    (busy,) = rl["busy_windows"]
    assert busy["jobs"] == BUSY_WINDOW_JOBS + 1 and busy["rate_limit_events"] == 3
    assert busy["end"] == NOW.isoformat() and busy["start"] == (NOW - timedelta(days=1)).isoformat()
    assert rl["per_24h_in_busy_windows"] == 3.0


def test_a_short_window_only_counts_what_lies_in_it(store):
    add(store, "recent", Status.succeeded, finished=NOW - timedelta(hours=1))
    add(store, "earlier", Status.failed, finished=NOW - timedelta(hours=30))
    limit(store, "earlier", NOW - timedelta(hours=30))
    report = build_report(store, timedelta(hours=24), now=NOW)
    assert report["jobs"]["finished"] == 1 and report["completion_rate"] == 1.0
    assert report["rate_limits"]["events"] == 0
    assert build_report(store, timedelta(days=2), now=NOW)["rate_limits"]["per_24h"] == 0.5


# -- footprint ---------------------------------------------------------------------------------------------


def _snapshot(ts: float) -> dict:
    return {"ts": ts, "budget": {"cpus": 4.0, "memory": 8 * 2**30, "reserve_memory": 256 * 2**20},
            "reserved": {"cpus": 1.0, "memory": 1280 * 2**20},
            "measured": {"executor": {"rss": 64 * 2**20, "cpu_percent": 1.5},
                         "jobs": {"cpu_cores": 0.5, "memory": 2**30}, "host": {"memory_available": 2**33}},
            "running": [{"job": "a"}], "queue_length": 2, "runners": []}


def test_footprint_of_a_running_executor(store, tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps(_snapshot(time.time())))
    f = build_report(store, timedelta(days=1), footprint=read_footprint(path))["footprint"]
    assert f["executor"] == "running"
    assert f["executor_rss"] == 64 * 2**20 and f["executor_rss_of_reserve"] == 0.25
    assert f["jobs_cpu_of_budget"] == 0.125 and f["jobs_memory_of_budget"] == 0.125
    assert f["running_jobs"] == 1 and f["queue_length"] == 2 and "note" not in f


def test_footprint_says_when_the_executor_is_not_running(store, tmp_path):
    path = tmp_path / "status.json"
    assert read_footprint(path) == {}
    path.write_text(json.dumps(_snapshot(time.time() - 3600)))
    report = build_report(store, timedelta(days=1), footprint=read_footprint(path))
    f = report["footprint"]
    assert f["executor"] == "not running" and "not running" in f["note"]
    assert f["executor_rss"] == 64 * 2**20  # its last measured figures are still shown
    assert "executor not running" in render_text(report)


# -- the command -------------------------------------------------------------------------------------------


def test_report_command_json_and_text(store, tmp_path, monkeypatch):
    add(store, "ok", Status.succeeded, finished=datetime.now(timezone.utc) - timedelta(minutes=1),
        models=["claude-sonnet-4-5"], usage=(10, 2, 0.5))
    from executor.surfaces.cli import main

    monkeypatch.setenv("EXECUTOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EXECUTOR_DATABASE_URL", store.url)
    done = CliRunner().invoke(main, ["report", "--since", "2d", "--json"])
    assert done.exit_code == 0, done.output
    view = json.loads(done.output)
    assert view["window"]["days"] == 2 and view["completion_rate"] == 1.0
    assert view["usage"]["cost_usd"] == 0.5
    text = CliRunner().invoke(main, ["report"])
    assert text.exit_code == 0 and "completion   100.0% (1/1 succeeded)" in text.output
    bad = CliRunner().invoke(main, ["report", "--since", "a week"])
    assert bad.exit_code != 0 and "not a duration" in bad.output


# -- metrics -----------------------------------------------------------------------------------------------


def scrape(metrics: ExecutorMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_mirror_the_store_in_one_query(store):
    t = NOW - timedelta(hours=1)
    add(store, "ok", Status.succeeded, finished=t, reason="committed", usage=(100, 10, 0.25))
    add(store, "rb", Status.rolled_back, finished=t, reason="tests_failed", usage=(50, 5, 0.5))
    add(store, "q", Status.queued, finished=None)
    limit(store, "rb", t, delay=1.0)
    limit(store, "rb", t, delay=2.0)
    agg = store.metric_counters()
    assert agg["usage"] == {"attempts": 2, "input_tokens": 150, "output_tokens": 15, "cost_usd": 0.75}
    metrics = ExecutorMetrics()
    metrics.refresh(store, _snapshot(time.time()))
    m = scrape(metrics)
    assert m[("executor_jobs_finished_total", (("reason", "committed"), ("runner", "scripted"),
                                               ("status", "succeeded")))] == 1
    assert m[("executor_jobs_finished_total", (("reason", "tests_failed"), ("runner", "scripted"),
                                               ("status", "rolled_back")))] == 1
    assert m[("executor_jobs", (("runner", "scripted"), ("status", "queued")))] == 1
    assert m[("executor_rate_limit_events_total", (("kind", "rate_limited"), ("runner", "scripted")))] == 2
    assert m[("executor_rate_limit_wait_seconds_total", (("runner", "scripted"),))] == 3.0
    assert m[("executor_tokens_total", (("direction", "input"),))] == 150
    assert m[("executor_cost_usd_total", ())] == 0.75
    assert m[("executor_budget_cpus", ())] == 4.0
    assert m[("process_resident_memory_bytes", ())] > 0  # the standard process collector
    assert m[("executor_build_info", (("version", "0.1.0"),))] == 1.0
    assert m[("executor_running_jobs", ())] == 1 and m[("executor_queue_length", ())] == 2
    from prometheus_client import REGISTRY

    assert "executor_jobs_finished" not in {name for name in REGISTRY._names_to_collectors}  # private registry


def test_every_host_of_the_store_is_in_the_metrics_and_the_report(store):
    from executor.scheduling.hosting import hosts_view
    from executor.store import Host

    for name, cpus in (("box1", 4.0), ("box2", 8.0)):
        store.register_host(Host(id=name, version="test", budget_cpus=cpus, budget_memory=8 * 2**30,
                                 reserve_memory=2**28, workspace_roots=["/r"]))
    store.beat("box2", 2.0, 3 * 2**30, 2, "job x waits: needs 4 cpus, 2 of 8 free")
    store.stop_host("box1")
    hosts = hosts_view(store, timeout=60)
    assert [(h["host"], h["state"], h["running"]) for h in hosts] == [("box1", "stopped", 0), ("box2", "alive", 2)]
    metrics = ExecutorMetrics()
    metrics.refresh(store, {**_snapshot(time.time()), "hosts": hosts})
    m = scrape(metrics)
    assert m[("executor_host_up", (("host", "box1"),))] == 0 and m[("executor_host_up", (("host", "box2"),))] == 1
    assert m[("executor_host_reserved_cpus", (("host", "box2"),))] == 2.0
    assert m[("executor_host_budget_cpus", (("host", "box2"),))] == 8.0
    assert m[("executor_host_running_jobs", (("host", "box2"),))] == 2
    add(store, "done-on-2", Status.succeeded, finished=NOW - timedelta(hours=1))
    store.update_job("done-on-2", host_id="box2")
    report = build_report(store, timedelta(days=1), now=NOW, hosts=hosts)
    assert [(h["host"], h["finished"]) for h in report["hosts"]] == [("box1", 0), ("box2", 1)]
    text = render_text(report)
    assert "box2 alive" in text and "2 of 8 cpus" in text


def test_sealed_jobs_api_usage_egress_and_unsealed_jobs_are_counted(store):
    t = NOW - timedelta(hours=1)
    sealed = add(store, "sealed", Status.succeeded, finished=t, reason="committed")
    add(store, "open", Status.succeeded, finished=t, reason="committed", runner="other")
    store.update_job("sealed", policy={"network": "sealed", "egress": ["packages.example.com:443"]})
    store.update_job("open", policy={"network": "bridge"})
    for status, tokens in ((200, (100, 20, 7, 50)), (200, (110, 30, 0, 60)), (429, (0, 0, 0, 0))):
        store.add_api_request(ApiRequest(job_id="sealed", attempt=1, runner="scripted", ts=t, path="/v1/messages",
                                         status=status, latency=0.1, duration=1.0, input_tokens=tokens[0],
                                         output_tokens=tokens[1], cache_creation_input_tokens=tokens[2],
                                         cache_read_input_tokens=tokens[3]))
    store.add_api_request(ApiRequest(job_id="sealed", attempt=1, runner="scripted", ts=NOW - timedelta(days=9),
                                     path="/v1/messages", status=200, latency=0.1, duration=1.0, input_tokens=999))
    with store.session() as session:
        for decision, host in (("denied", "example.org"), ("denied", "example.org"), ("allowed", "packages.example.com")):
            session.add(Event(job_id=sealed.id, session_id=sealed.session_id, attempt=1, ts=t, kind="egress",
                              data={"decision": decision, "host": host, "port": 443}))
        # identical decisions are one event with their count (sandbox/journal.py): counted as decisions
        session.add(Event(job_id=sealed.id, session_id=sealed.session_id, attempt=1, ts=t, kind="egress",
                          data={"decision": "denied", "host": "example.org", "port": 443, "count": 5}))
        session.commit()
    report = build_report(store, timedelta(days=7), now=NOW + timedelta(minutes=5))
    assert report["api"] == {"requests": 3, "by_status": {"200": 2, "429": 1}, "input_tokens": 210,
                             "output_tokens": 50, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 110,
                             "runners": {"scripted": {"requests": 3, "input_tokens": 210, "output_tokens": 50,
                                                      "cache_creation_input_tokens": 7,
                                                      "cache_read_input_tokens": 110}}}
    assert report["egress"] == {"allowed": 1, "denied": 7, "denied_by_destination": {"example.org:443": 7}}
    assert report["network"] == {"bridge": 1, "sealed": 1} and report["unsealed_jobs"] == 1
    text = render_text(report)
    assert "api usage    3 requests of sealed jobs, as the API reported them: 210 input + 50 output tokens" in text
    assert "egress       1 allowed, 7 denied (example.org:443 x7)" in text
    assert "network      1 bridge, 1 sealed; 1 UNSEALED (bridge/host opt-in)" in text
    metrics = ExecutorMetrics()
    metrics.refresh(store)
    m = scrape(metrics)
    assert m[("executor_api_requests_total", (("runner", "scripted"), ("status", "200")))] == 3  # all time
    assert m[("executor_api_requests_total", (("runner", "scripted"), ("status", "429")))] == 1
    assert m[("executor_api_tokens_total", (("kind", "input"),))] == 1209
    assert m[("executor_api_tokens_total", (("kind", "cache_read"),))] == 110
    assert m[("executor_egress_decisions_total", (("decision", "denied"),))] == 7
    assert m[("executor_egress_decisions_total", (("decision", "allowed"),))] == 1


def test_metrics_follow_prometheus_conventions(store):
    """Durations and waits are histograms in seconds, shares are ratios, refused files a counter."""
    metrics = ExecutorMetrics()
    t = NOW - timedelta(hours=1)
    job = add(store, "h1", Status.succeeded, finished=t, reason="committed")
    job.started_at, job.created_at, job.finished_at = t - timedelta(seconds=90), t - timedelta(seconds=100), t
    metrics.job_settled(job)
    metrics.rejected.inc(3)
    metrics.refresh(store, _snapshot(time.time()))
    m = scrape(metrics)
    assert m[("executor_job_duration_seconds_bucket", (("le", "60.0"), ("status", "succeeded")))] == 0
    assert m[("executor_job_duration_seconds_bucket", (("le", "120.0"), ("status", "succeeded")))] == 1
    assert m[("executor_job_duration_seconds_sum", (("status", "succeeded"),))] == 90
    assert m[("executor_job_queue_wait_seconds_sum", ())] == 10
    assert m[("executor_spool_rejected_files_total", ())] == 3
    assert 0 < m[("executor_reserved_cpus_ratio", ())] <= 1
    assert not any(name.endswith("_percent") for name, _ in m)


def test_metrics_refresh_never_raises(store):
    metrics = ExecutorMetrics()
    store.close()
    store.engine.dispose()
    broken = Store.__new__(Store)
    broken.engine = None  # type: ignore[assignment]
    metrics.refresh(broken)  # logged, not raised
    assert scrape(metrics)[("executor_cost_usd_total", ())] == 0


def test_the_graded_gates_figures(store):
    t = NOW - timedelta(hours=1)

    def graded(job_id: str, status: Status, reason: str, **record) -> None:
        add(store, job_id, status, finished=None if status == Status.awaiting_review else t, reason=reason)
        store.update_job(job_id, evaluation={"flaky": [], **record})

    graded("fix", Status.succeeded, "committed", kind="tests_and_code", verdict="passed", proved=True,
           flaky=["tests.test_f::test_flip"])
    graded("harden", Status.succeeded, "committed", kind="tests", verdict="passed", proved=True)
    graded("weak", Status.rolled_back, "weak_tests", kind="tests_and_code", verdict="weak_tests", proved=False)
    graded("vacuous", Status.rolled_back, "no_coverage_gain", kind="tests", verdict="no_coverage_gain",
           proved=False)
    graded("to-review", Status.awaiting_review, "review", kind="tests_and_code", verdict="weak_tests", proved=False)
    graded("broke", Status.rolled_back, "regression", kind="code", verdict="regression", proved=None)
    graded("plain", Status.succeeded, "committed", kind="code", verdict="passed", proved=None)
    graded("noreport", Status.failed, "evaluation_error", kind=None, verdict="evaluation_error")
    add(store, "exit-code", Status.succeeded, finished=t, reason="committed")  # not graded: no record

    report = build_report(store, timedelta(days=7), now=NOW)
    assert report["evaluation"] == {
        "graded": 7, "test_writing": 5, "test_writing_share": round(5 / 7, 4), "hardening": 2, "proved": 2,
        "proof_rate": 0.4, "weak_test_rejections": 3, "regressions_caught": 1, "evaluation_errors": 1,
        "flaky_tests": 1}
    assert report["rollbacks"]["tests_failed"] == 3  # the graded gate's rollbacks are the test gate's
    assert ("evaluation   7 graded: 5 wrote tests (71.4%, 2 only tests), proof rate 40.0%; 3 weak-test "
            "rejections, 1 regressions caught, 1 flaky tests") in render_text(report)
