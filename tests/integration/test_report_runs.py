"""The report, the metrics endpoint and the structured logs, checked against a store filled by real runs:
the real engine, the sandbox image and the Claude Code CLI against the scripted Messages API.

Five jobs run once for the module: three succeed, one's tests fail (rolled back), one is rate limited on
every attempt until it fails. The report (in-process and ``executor report --json``) and a scrape of the
executor's /metrics endpoint must agree with what the store holds.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from executor.store import Status
from executor.surfaces.report import build_report, read_footprint
from tests.conftest import TOKEN_VALUE, TOKEN_VAR, RunningExecutor, World, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

ROOT = Path(__file__).resolve().parents[2]
EXECUTOR = ROOT / ".venv" / "bin" / "executor"
if not EXECUTOR.exists():  # pragma: no cover - another virtualenv layout
    EXECUTOR = Path(shutil.which("executor") or EXECUTOR)

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
LIMIT = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "0"})
OK_JOBS = ("rep-ok-1", "rep-ok-2", "rep-ok-3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def write(name: str) -> list[Turn]:
    return [Turn.tool("Write", {"file_path": f"/workspace/{name}.txt", "content": f"{name}\n"}), Turn.text("Done.")]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(metrics: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


@pytest.fixture(scope="module")
def ran(tmp_path_factory, docker_client):
    """Five real jobs through one executor with its metrics endpoint on; the executor keeps running."""
    root = tmp_path_factory.mktemp("report") / "world"
    world = World(root=root, home=root / "home", policies=root / "policies", repos=root / "repos")
    for d in (world.home, world.policies, world.repos):
        d.mkdir(parents=True)
    script = {name: write(name) for name in OK_JOBS}
    script["rep-tests"] = write("rep-tests")
    script["rep-limited"] = [LIMIT] * 10
    port = free_port()
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cli_max_retries=0, backoff_initial="1s", backoff_multiplier=2, max_attempts=2)
        running = RunningExecutor(world.settings(metrics_port=port), {TOKEN_VAR: TOKEN_VALUE}, docker_client).start()
        try:
            store = running.executor.store
            for name in OK_JOBS:
                world.submit(id=name, workspace=str(world.repo(name)), prompt=f"{name}: write a file")
            world.submit(id="rep-tests", workspace=str(world.repo("rep-tests")), prompt="rep-tests: write a file",
                   test_command="false")
            world.submit(id="rep-limited", workspace=str(world.repo("rep-limited")), prompt="rep-limited: try")
            jobs = {name: wait_status(store, name, SETTLED, timeout=240)
                    for name in (*OK_JOBS, "rep-tests", "rep-limited")}
            yield world, running, port, jobs
        finally:
            running.close()


def test_the_runs_ended_as_scripted(ran):
    _world, _running, _port, jobs = ran
    assert [jobs[n].status for n in OK_JOBS] == [Status.succeeded] * 3, [(j.reason, j.error) for j in jobs.values()]
    assert (jobs["rep-tests"].status, jobs["rep-tests"].reason) == (Status.rolled_back, "tests_failed")
    assert (jobs["rep-limited"].status, jobs["rep-limited"].reason) == (Status.failed, "rate_limited")


def test_report_figures_match_the_store(ran):
    _world, running, _port, _jobs = ran
    store = running.executor.store
    report = build_report(store, timedelta(days=7))
    assert report["jobs"]["finished"] == 5
    assert report["jobs"]["by_status"]["succeeded"] == 3
    assert report["completion_rate"] == round(3 / 5, 4)
    assert report["rollbacks"]["total"] == 1
    assert report["rollbacks"]["tests_failed"] == 1 and report["rollbacks"]["agent_error"] == 0
    assert report["rollbacks"]["by_reason"] == {"tests_failed": 1}
    events = store.rate_limits()
    assert len(events) == 2  # max_attempts 2, each ended by a 429
    assert report["rate_limits"]["events"] == len(events)
    assert report["rate_limits"]["per_24h"] == round(len(events) / 7, 3)
    delays = [e.retry_delay for e in events if e.retry_delay is not None]
    assert report["rate_limits"]["mean_wait_seconds"] == (round(sum(delays) / len(delays), 3) if delays else None)
    assert report["rate_limits"]["busy_windows"] == []  # 5 jobs: no window is busy
    assert report["timeouts"]["total"] == 0 and report["stalls"]["events"] == 0
    runner = report["runners"]["scripted"]
    assert runner["jobs"] == 5 and runner["by_status"] == {"failed": 1, "rolled_back": 1, "succeeded": 3}
    assert runner["models"] == ["claude-sonnet-4-5"] and runner["rate_limit_events"] == len(events)
    attempts = [a for job in store.jobs() for a in store.attempts(job.id)]
    usage = report["usage"]
    assert usage["attempts"] == len(attempts) == 6
    assert usage["input_tokens"] == sum(a.input_tokens or 0 for a in attempts) > 0
    assert usage["output_tokens"] == sum(a.output_tokens or 0 for a in attempts) > 0
    assert usage["cost_usd"] == pytest.approx(sum(a.cost_usd or 0 for a in attempts), abs=1e-6)
    assert usage["cost_usd"] > 0
    assert report["duration_seconds"]["count"] == 5
    assert 0 < report["duration_seconds"]["p50"] <= report["duration_seconds"]["p95"]
    assert report["queue_wait_seconds"]["p50"] >= 0


def test_report_command_gives_the_same_figures(ran):
    world, running, _port, _jobs = ran
    done = subprocess.run([str(EXECUTOR), "report", "--since", "7d", "--json"], env=world.env(),
                          capture_output=True, timeout=60, cwd=world.root)
    assert done.returncode == 0, done.stderr.decode()
    view = json.loads(done.stdout)
    inproc = build_report(running.executor.store, timedelta(days=7))
    for key in ("jobs", "completion_rate", "rollbacks", "stalls", "timeouts", "runners", "usage"):
        assert view[key] == inproc[key], key
    assert view["rate_limits"]["events"] == inproc["rate_limits"]["events"] == 2
    assert view["completion_rate"] == 0.6
    assert view["footprint"]["executor"] == "running"  # the module's executor still ticks
    assert view["footprint"]["budget"]["cpus"] == world.settings().budget_cpus
    assert view["footprint"]["executor_rss"] > 0
    text = subprocess.run([str(EXECUTOR), "report"], env=world.env(), capture_output=True, timeout=60,
                          cwd=world.root)
    assert text.returncode == 0, text.stderr.decode()
    assert "completion   60.0% (3/5 succeeded)" in text.stdout.decode()
    assert TOKEN_VALUE not in text.stdout.decode() + done.stdout.decode()


def test_footprint_is_read_from_the_status_file(ran):
    world, running, _port, _jobs = ran
    footprint = read_footprint(world.settings().status_path)
    assert footprint["fresh"] and footprint["pid"] == running.executor.status()["pid"]
    f = build_report(running.executor.store, timedelta(days=1), footprint=footprint)["footprint"]
    assert f["executor"] == "running" and f["executor_rss_of_reserve"] > 0


def test_metrics_endpoint_matches_the_store(ran):
    _world, running, port, _jobs = ran
    store = running.executor.store
    metrics = wait_for(lambda: (m := scrape(port)) and total(m, "executor_jobs_finished_total") == 5 and m,
                       20, "the metrics to show the five finished jobs")
    assert total(metrics, "executor_jobs_finished_total", status="succeeded") == 3
    assert total(metrics, "executor_jobs_finished_total", status="rolled_back", reason="tests_failed") == 1
    assert total(metrics, "executor_jobs_finished_total", status="failed", reason="rate_limited") == 1
    assert total(metrics, "executor_jobs", status="succeeded", runner="scripted") == 3
    assert total(metrics, "executor_rate_limit_events_total", runner="scripted") == len(store.rate_limits()) == 2
    attempts = [a for job in store.jobs() for a in store.attempts(job.id)]
    assert total(metrics, "executor_tokens_total", direction="input") == sum(a.input_tokens or 0 for a in attempts)
    assert total(metrics, "executor_tokens_total", direction="output") == sum(a.output_tokens or 0 for a in attempts)
    assert total(metrics, "executor_cost_usd_total") == pytest.approx(sum(a.cost_usd or 0 for a in attempts))
    assert total(metrics, "executor_attempts_total") == len(attempts)
    settings = running.executor.settings
    assert total(metrics, "executor_budget_cpus") == settings.budget_cpus
    assert total(metrics, "executor_budget_memory_bytes") == settings.budget_memory
    assert total(metrics, "executor_reserved_memory_bytes") == settings.reserve_memory  # nothing runs now
    assert total(metrics, "executor_running_jobs") == 0 and total(metrics, "executor_queue_length") == 0
    assert total(metrics, "process_resident_memory_bytes") > 0
    # every job of the run was observed as it settled: durations and queue waits, in seconds
    assert total(metrics, "executor_job_duration_seconds_count") == 5
    assert total(metrics, "executor_job_queue_wait_seconds_count") == 5


# -- `executor serve` with EXECUTOR_LOG_FORMAT=json and EXECUTOR_METRICS_PORT -------------------------------


def test_serve_logs_one_json_line_per_state_change_and_serves_metrics(world, docker_client, tmp_path):
    port = free_port()
    with ScriptedAPI({"json-logs": write("json-logs")}) as api:
        world.write_runners(api.base_url)
        repo = world.repo("json-logs")
        env = {**world.env(), "EXECUTOR_LOG_FORMAT": "json", "EXECUTOR_METRICS_PORT": str(port)}
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([str(EXECUTOR), "serve"], env=env, stdout=log_file, stderr=log_file,
                                    cwd=world.root)
            try:
                wait_for(lambda: (world.home / "status.json").exists() or proc.poll() is not None, 60,
                         "the executor's first tick")
                assert proc.poll() is None, log_path.read_text()[-3000:]
                store = world.store()
                world.submit(id="json-logs", workspace=str(repo), prompt="json-logs: write a file")
                job = wait_status(store, "json-logs", SETTLED, timeout=180)
                metrics = wait_for(lambda: (m := scrape(port)) and total(m, "executor_jobs_finished_total") and m,
                                   20, "the metrics endpoint")
            finally:
                proc.terminate()
                code = proc.wait(timeout=120)
    assert code == 0
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert total(metrics, "executor_jobs_finished_total", status="succeeded", runner="scripted") == 1
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and len(records) == len([line for line in lines if line.strip()]), lines[:20]  # all JSON
    states = [r for r in records if r.get("action") == "state" and r.get("job") == "json-logs"]
    stored = [e for e in store.events(job_id="json-logs") if e.kind == "state"]
    # one line per state change, in the order the store recorded them
    assert [r["status"] for r in states] == [e.data["status"] for e in stored]
    assert [r["status"] for r in states] == ["running", "testing", "committing", "succeeded"]
    for record in states:
        assert record["session"] == "json-logs" and record["runner"] == "scripted" and record["attempt"] == 1
        assert record["level"] == "info" and record["ts"]
    assert states[-1]["reason"] == "committed"
    assert TOKEN_VALUE not in log_path.read_text()
    store.close()
