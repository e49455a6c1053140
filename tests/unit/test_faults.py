"""Faults of the machine without an engine: a claim the store refuses holds nothing, a job whose thread lost
the engine is held by its host (its slot kept) until it is resolved, a crash that cannot be recorded is
recorded later, a late heartbeat judges no other host lost, and the words and classes the loop goes by.
The acceptance tier restarts a real engine and a real PostgreSQL and fills a real file system
(tests/acceptance/test_engine_restart.py, test_store_restart.py, test_full_disk.py)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import requests
import urllib3
from sqlalchemy.exc import IntegrityError, OperationalError

from executor.errors import EngineUnavailable
from executor.sandbox.deployment import Sandbox
from executor.sandbox.health import EngineHealth, timed_out
from executor.scheduling import admission
from executor.scheduling.governor import Governor
from executor.settings import Settings, parse_size
from executor.store import Status, Store
from executor.store.health import StoreHealth, unavailable
from tests.unit.fakes import FakeDeployment
from tests.unit.test_scheduling import _executor, job


def _run_until(executor, predicate, what: str, rounds: int = 200) -> None:
    """Rounds of ``tick`` until ``predicate`` holds. Without ``serve`` no watcher wakes the loop for a re-queued
    job: it is claimed at the next ``claim_poll`` (0.1 s in these executors)."""
    for _ in range(rounds):
        executor.tick()
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not reached: {what}")


# ------------------------------------------------------------------------------------------------ claims


def test_a_claim_the_store_refuses_releases_its_lease(tmp_path):
    store = Store(tmp_path / "executor.db")
    store.add_job(job("a"))
    gov = Governor(2.0, parse_size("64g"), parse_size("256m"))
    (tmp_path / "executor.db").rename(tmp_path / "gone.db")  # the store's file is not there any more
    store.engine.dispose()  # new connections find an empty database: every statement fails
    with pytest.raises(OperationalError) as raised:
        admission.claim(store, gov, admission.Host("h1", ("/w",)), {}, {})
    assert unavailable(raised.value)
    assert gov.snapshot()["reserved"]["cpus"] == 0  # the lease went back
    assert gov.lease() is not None  # and the next round can lease again
    store.close()


# ---------------------------------------------------------------------------------- held, then resolved


def test_a_job_whose_thread_lost_the_engine_is_held_with_its_slot_until_it_is_requeued(tmp_path, monkeypatch):
    calls: list[int] = []

    def run_job(ctx, job_id):
        calls.append(ctx.store.get(job_id).attempts)
        if len(calls) == 1:
            raise EngineUnavailable("the engine went away under the attempt")
        ctx.store.transition(job_id, Status.running, Status.rolled_back, reason="agent_error")

    executor = _executor(tmp_path, monkeypatch, run_job, claim_poll=0.1)
    executor.store.add_job(job("e1"))
    _run_until(executor, lambda: "e1" in executor.unsettled, "the job held")
    executor.tick()
    assert "e1" in executor.slots  # not reaped: the job is still this host's, its permit held
    assert executor.governor.snapshot()["reserved"]["cpus"] == 1.0
    status = executor.status()
    assert [h["job"] for h in status["unsettled"]] == ["e1"]
    assert any(p.startswith("job e1 could not be settled") for p in status["problems"])
    assert executor.store.get("e1").status == Status.running  # owned by its host, not abandoned

    executor.unsettled.wake()
    _run_until(executor, lambda: executor.store.get("e1").status == Status.rolled_back, "the second attempt")
    assert calls == [1, 2]  # rolled back and re-queued (its container gone), then run again
    states = [e.data for e in executor.store.events(job_id="e1") if e.kind == "state"]
    assert [s["reason"] for s in states if s["status"] == "queued"] == ["interrupted"]
    assert "e1" not in executor.unsettled
    executor.store.close()


def test_a_crash_whose_ending_cannot_be_recorded_is_held_and_recorded_once_the_engine_answers(tmp_path, monkeypatch):
    refusals = [requests.ConnectionError("the engine's socket is gone")]

    class Engine(FakeDeployment):
        def remove_job_objects(self, job_id: str) -> None:
            if refusals:
                raise refusals.pop()
            super().remove_job_objects(job_id)

    def run_job(ctx, job_id):
        raise RuntimeError("a bug")

    executor = _executor(tmp_path, monkeypatch, run_job, Engine(), claim_poll=0.1)
    executor.store.add_job(job("c1"))
    _run_until(executor, lambda: "c1" in executor.unsettled, "the crashed job held")
    assert executor.store.get("c1").status == Status.running
    executor.unsettled.wake()
    _run_until(executor, lambda: executor.store.get("c1").status.terminal, "the crash recorded")
    crashed = executor.store.get("c1")
    assert (crashed.status, crashed.reason, crashed.attempts) == (Status.failed, "internal", 1)
    executor.store.close()


def test_a_held_job_is_left_as_it_is_at_shutdown_and_recovered_at_the_next_start(tmp_path, monkeypatch):
    from executor.scheduling.recovery import recover

    def run_job(ctx, job_id):
        raise EngineUnavailable("the engine went away under the attempt")

    executor = _executor(tmp_path, monkeypatch, run_job, claim_poll=0.1)
    executor.store.add_job(job("s1"))
    _run_until(executor, lambda: "s1" in executor.unsettled, "the job held")
    executor.shutdown(grace=0.1)  # the store closes; the job is left as it is, no thread and no slot
    assert not executor.slots and not executor.unsettled

    again = _executor(tmp_path, monkeypatch, run_job, claim_poll=0.1)
    assert again.store.get("s1").status == Status.running  # still this host's, for its recovery
    recover(again)  # its container is gone: rolled back and re-queued, as after a kill -9
    assert again.store.get("s1").status == Status.queued
    states = [e.data for e in again.store.events(job_id="s1") if e.kind == "state"]
    assert states[-1]["status"] == "queued" and states[-1]["reason"] == "interrupted"
    again.store.close()


# --------------------------------------------------------------------------------------------- hosts


def test_a_late_heartbeat_judges_no_other_host_lost_until_it_has_been_on_time_for_a_timeout(tmp_path):
    from executor.scheduling.hosting import Presence

    store = Store(tmp_path / "executor.db")

    def presence(host: str, root: str) -> Presence:
        settings = Settings(home=tmp_path / host, workspace_roots=[root], host_id=host, host_heartbeat=0.1,
                            host_timeout=1.0)
        return Presence(settings, store, lambda: {"reserved_cpus": 0.0, "reserved_memory": 0, "running": 0,
                                                  "waiting": None})

    presence("host-a", "/w").register()
    store.add_job(job("on-a", status=Status.running, host_id="host-a", attempts=1))
    b = presence("host-b", "/elsewhere")  # it may mark host-a's job, never take it over
    b.register()
    time.sleep(1.5)  # host-a is silent; so was host-b (its heartbeat waited, as for a database away)
    b.beat()
    assert store.get("on-a").interrupted_at is None  # a late beat judges no one
    deadline = time.monotonic() + 1.3
    while time.monotonic() < deadline:  # on time for longer than the timeout
        time.sleep(0.1)
        b.beat()
    assert store.get("on-a").interrupted_at is not None  # now host-a is lost
    store.close()


# ------------------------------------------------------------------------------------ words and classes


def test_an_adopted_sealed_agent_that_could_not_reach_its_gateway_is_re_queued_not_failed():
    """While the executor restarts, a sealed job's gateway is not served: the CLI's calls fail with no HTTP
    status (ECONNRESET). That is the executor's doing; an API error the gateway answered is the job's."""
    from executor.errors import ApiError, Interrupted
    from executor.job.judge import judge_agent
    from executor.policy import Policy
    from tests.unit.test_scheduling import RUNNER, run_of

    unreachable = run_of("api_error")
    with pytest.raises(Interrupted, match="could not reach its API gateway"):
        judge_agent(RUNNER, Policy(), unreachable, gateway_gap=True)
    with pytest.raises(ApiError):
        judge_agent(RUNNER, Policy(), unreachable)  # its gateway was served throughout: the job's own error
    answered = run_of("api_error")
    answered.state.api_error_statuses.append(500)
    with pytest.raises(ApiError):
        judge_agent(RUNNER, Policy(), answered, gateway_gap=True)


def test_an_outage_seen_during_an_attempt_means_its_ending_is_not_vouched_for():
    answers = threading.Event()
    answers.set()

    def ping():
        if not answers.is_set():
            raise requests.ConnectionError("no socket")

    health = EngineHealth(ping=ping)
    since = health.epoch
    health.vouch(since)  # answered throughout
    answers.clear()
    with pytest.raises(EngineUnavailable):
        health.vouch(since)  # does not answer now
    assert not health.reachable and health.reason().startswith("engine unreachable since ")
    assert health.reason().endswith(" UTC") and len(health.reason().split()[-2]) == 8  # HH:MM:SS
    answers.set()
    with pytest.raises(EngineUnavailable, match="no socket"):
        health.vouch(since)  # it answers again, but it was away during the attempt


def test_a_read_timeout_is_not_an_engine_failure_but_a_missing_socket_is():
    timeout = requests.ConnectionError(urllib3.exceptions.ReadTimeoutError(None, "/wait", "Read timed out."))
    assert timed_out(timeout)
    assert not timed_out(requests.ConnectionError(("Connection aborted.", FileNotFoundError(2, "No such file"))))


def test_the_store_is_unavailable_when_it_cannot_be_reached_or_written_and_a_bug_is_no_outage():
    full = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    assert unavailable(full) and unavailable(sqlite3.OperationalError("database is locked"))
    assert not unavailable(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE")))
    assert not unavailable(ValueError("a bug"))
    health = StoreHealth()
    health.failed(full)
    assert health.reason().startswith("the store is unavailable since ") and "disk is full" in health.reason()
    assert not health.due()  # the loop waits its backoff before it tries again
    health.answered()
    assert health.reason() is None and health.due()


def test_a_volume_is_ours_by_its_name_even_without_labels():
    sandbox = Sandbox(client=None, image="i", instance="abc123")
    assert sandbox.job_of("executor-abc123-job-1-a2") == "job-1"
    assert sandbox.job_of("executor-abc123-x-a1-a2-home") == "x-a1"  # an id may itself hold "-a1"
    assert sandbox.job_of("executor-abc123-x-a3-test") == "x"
    assert sandbox.job_of("executor-other-job-a1") is None  # another executor's
    assert sandbox.job_of("executor-abc123-doctor-ff00") is None  # not a job's
