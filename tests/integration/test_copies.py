"""A host switching from its SQLite file to a PostgreSQL store keeps its history: ``executor db copy`` carries
every table into the empty PostgreSQL store (a real SQLite file, a real PostgreSQL 15 database); until then
``doctor`` says the new store started an empty history beside the old one."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from executor.clock import utcnow
from executor.settings import Settings
from executor.store import ApiRequest, Heartbeat, Host, Job, RateLimitEvent, Status, Store
from executor.store.copies import left_behind
from executor.surfaces.cli import main
from executor.surfaces.doctor import Doctor


def _history(path: Path) -> None:
    """A SQLite store with a finished job (attempt, events, a gateway request, a rate limit, heartbeats), a
    queued one, a runner's cooldown and the host that ran them."""
    store = Store(path)
    for job_id, runner in (("done", "r"), ("next", "r2")):
        store.add_job(Job(id=job_id, session_id=job_id, runner=runner, model_requested="m", workspace=f"/w/{job_id}",
                          prompt="p", policy_name="default", policy={"cpus": 1.0}, models_seen=["m"]))
    store.register_host(Host(id="box1", version="test", budget_cpus=4, budget_memory=2**33, reserve_memory=2**28,
                             workspace_roots=["/w"]))
    job = store.transition("done", Status.queued, Status.running, attempts=1, host_id="box1")
    store.start_attempt("done", 1, "box1")
    store.add_events(job, 1, [("turn", {"n": 1}), ("tool_call", {"name": "Bash", "input": {"command": "ls"}})])
    store.add_heartbeat(Heartbeat(job_id="done", attempt=1, state="progress", cpu_cores=0.5))
    store.add_api_request(ApiRequest(job_id="done", attempt=1, runner="r", path="/v1/messages", status=200,
                                     latency=0.1, duration=0.2, input_tokens=10, rate_limits={"retry-after": "1"}))
    store.add_rate_limit(RateLimitEvent(runner="r", job_id="done", attempt=1, kind="rate_limited", retry_delay=2.0))
    store.cool_down("r", utcnow() + timedelta(minutes=5), "429")
    store.transition("done", Status.running, Status.testing)
    store.transition("done", Status.testing, Status.rolled_back, reason="tests_failed", error="1 failed")
    store.close()


def test_a_sqlite_history_is_carried_into_an_empty_postgresql_store(tmp_path, pg_empty_url):
    home = tmp_path / "home"
    _history(home / "executor.db")
    settings = Settings(home=home, database_url=pg_empty_url)
    assert left_behind(settings.db_path, pg_empty_url) == 2  # the new store is not even made yet

    store_check = Doctor(settings, {}).check_store()
    assert store_check.status == "warning", store_check
    assert f"the SQLite store {settings.db_path} holds 2" in store_check.detail
    assert "empty history" in store_check.detail
    assert "executor db copy" in store_check.fix

    env = {"EXECUTOR_HOME": str(home), "EXECUTOR_DATABASE_URL": pg_empty_url}
    serving = CliRunner().invoke(main, ["db", "copy"], env=env)  # box1 still beats
    assert serving.exit_code == 1 and "host box1 still serves" in serving.output and "stop it first" in serving.output
    old = Store(settings.db_path)
    old.stop_host("box1")  # a clean stop, as `docker compose stop executor` makes
    old.close()

    done = CliRunner().invoke(main, ["db", "copy", "--json"], env=env)
    assert done.exit_code == 0, done.output
    rows = json.loads(done.output)["rows"]
    assert (rows["job"], rows["attempt"], rows["event"], rows["apirequest"], rows["heartbeat"], rows["host"],
            rows["ratelimitevent"], rows["runnerstate"]) == (2, 1, 2, 1, 1, 1, 1, 1)

    old, new = Store(settings.db_path), Store(pg_empty_url)
    try:
        for job_id in ("done", "next"):
            before, after = old.get(job_id), new.get(job_id)
            assert after.model_dump() == before.model_dump()
        [attempt] = new.attempts("done")
        assert (attempt.status, attempt.reason, attempt.host_id) == ("rolled_back", "tests_failed", "box1")
        assert [(e.id, e.kind, e.data) for e in new.events(job_id="done")] == \
            [(e.id, e.kind, e.data) for e in old.events(job_id="done")]
        assert new.api_requests("done")[0].rate_limits == {"retry-after": "1"}
        assert new.runner_states()["r"].cooldown_until == old.runner_states()["r"].cooldown_until
        assert new.claim("box1", ["/w"], 8, 2**34).id == "next"  # the queue came along (r cools down)
        # the copied ids do not collide with new rows: PostgreSQL's sequences continue after them
        new.add_event(new.get("next"), 1, "state", {"status": "running"})
        assert new.events(job_id="next")[0].id > max(e.id for e in old.events())
        new.start_attempt("next", 1, "box1")
    finally:
        old.close()
        new.close()

    assert left_behind(settings.db_path, pg_empty_url) == 0
    assert Doctor(settings, {}).check_store().status == "ok"
    again = CliRunner().invoke(main, ["db", "copy"], env=env)
    assert again.exit_code == 1 and "already holds 2 jobs: copy only into an empty store" in again.output


def test_nothing_is_left_behind_without_a_sqlite_history(tmp_path, pg_url):
    assert left_behind(tmp_path / "executor.db", pg_url) == 0  # no file
    Store(tmp_path / "executor.db").close()
    assert left_behind(tmp_path / "executor.db", pg_url) == 0  # a file without jobs
    same = CliRunner().invoke(main, ["db", "copy"], env={"EXECUTOR_HOME": str(tmp_path)})
    assert same.exit_code == 1 and "is the store EXECUTOR_DATABASE_URL names" in same.output
