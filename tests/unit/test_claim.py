"""Admission from the shared queue, on both engines (a real SQLite file and a real PostgreSQL 15 database):
the governor's lease first, then one claim statement per job; order and head-of-line per host; cooldowns,
busy workspaces and sessions, and runner limits that never block the line; roots that decide which host may
claim what; no job claimed twice, no workspace held twice; a lost host's jobs taken over only where the rules
allow, and a stale attempt fenced off."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from executor.clock import utcnow
from executor.errors import IllegalTransition
from executor.policy import Policy, Runner
from executor.scheduling import admission
from executor.scheduling.governor import Governor
from executor.settings import parse_size
from executor.store import Host, Job, Status, Store
from executor.transaction.commit import Phase

RUNNER = Runner(name="r", model="claude-sonnet-4-5", auth_env="T")
RUNNERS = {"r": RUNNER}
A = admission.Host("host-a", ("/w",))


def job(job_id: str, *, cpus: float = 1.0, runner: str = "r", workspace: str | None = None,
        session: str | None = None, **fields) -> Job:
    return Job(id=job_id, session_id=session or job_id, runner=runner, model_requested="m",
               workspace=workspace or f"/w/{job_id}", prompt="p", policy_name="default",
               policy=Policy(cpus=cpus, memory="512m").model_dump(), **fields)


def governor(cpus: float = 2.0) -> Governor:
    return Governor(cpus, parse_size("64g"), parse_size("256m"))


def started(plan: admission.Plan) -> list[str]:
    return [j.id for j, _ in plan.starts]


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def add(store: Store, *jobs: Job) -> None:
    for j in jobs:
        store.add_job(j)


def register(store: Store, host_id: str, roots=("/w",)) -> None:
    store.register_host(Host(id=host_id, version="test", budget_cpus=4, budget_memory=2**33,
                             reserve_memory=2**28, workspace_roots=list(roots)))


def silence(store: Store, host_id: str, seconds: float = 3600) -> None:
    """The host's last heartbeat, ``seconds`` ago."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE host SET last_seen = :ts WHERE id = :id"),
                     {"ts": utcnow() - timedelta(seconds=seconds), "id": host_id})


# ------------------------------------------------------------------------------------------ order


def test_jobs_start_in_priority_then_arrival_order_while_they_fit(store):
    add(store, job("a"), job("b"), job("hi", priority=5), job("c"))
    gov = governor(2.0)
    plan = admission.claim(store, gov, A, RUNNERS, {})
    assert started(plan) == ["hi", "a"]
    assert plan.waiting is not None and "job b waits" in plan.waiting and "cpus" in plan.waiting
    assert gov.reserved_cpus == 2.0 and {p["job"] for p in gov.snapshot()["permits"]} == {"hi", "a"}
    claimed = store.get("hi")
    assert (claimed.status, claimed.host_id, claimed.attempts) == (Status.running, "host-a", 1)
    assert claimed.workspace_lock == "/w/hi" and claimed.session_lock == "hi" and claimed.start_ns


def test_a_head_that_does_not_fit_is_never_overtaken(store):
    add(store, job("big", cpus=2.0), job("small", cpus=1.0))
    gov = governor(2.0)
    assert gov.try_reserve("running", Policy(cpus=1.0)) is not None
    plan = admission.claim(store, gov, A, RUNNERS, {})
    assert started(plan) == [] and "job big waits" in plan.waiting
    assert store.get("small").status == Status.queued
    assert gov.reserved_cpus == 1.0  # the lease was given back


def test_cooldown_runner_limit_and_busy_workspace_or_session_do_not_block_the_line(store):
    limited = Runner(name="limited", model="m", auth_env="T", max_concurrent=1)
    runners = {"r": RUNNER, "limited": limited, "cooling": RUNNER}
    add(store, job("holder", workspace="/w/shared"), job("in-session", session="sess"))
    assert store.claim("host-b", ["/w"], 8, 2**34).id == "holder"  # another host holds /w/shared
    assert store.claim("host-b", ["/w"], 8, 2**34).id == "in-session"  # ... and the session "sess"
    store.cool_down("cooling", utcnow() + timedelta(minutes=5), "rate limited")  # seen by any host
    add(store, job("cool", runner="cooling"), job("busy", workspace="/w/shared"), job("same-session", session="sess"),
        job("limited2", runner="limited"), job("free"))
    plan = admission.claim(store, governor(8.0), A, runners, {"limited": 1})
    assert started(plan) == ["free"] and plan.waiting is None
    assert {store.get(j).status for j in ("cool", "busy", "same-session", "limited2")} == {Status.queued}


def test_a_revision_is_claimed_only_by_the_host_that_keeps_its_change_and_judged_from_when_it_began(store):
    b = admission.Host("host-b", ("/w",))
    add(store, job("base", status=Status.rolled_back, host_id="host-b", reason="changes_requested"),
        job("rev", builds_on="base", follows="base", start_ns=1234))
    assert started(admission.claim(store, governor(), A, RUNNERS, {})) == []  # the change is on host B's disk
    assert started(admission.claim(store, governor(), b, RUNNERS, {})) == ["rev"]
    claimed = store.get("rev")
    assert claimed.host_id == "host-b" and claimed.start_ns == 1234


def test_a_cooldown_that_ended_lets_the_runner_start_again(store):
    store.cool_down("r", utcnow() + timedelta(seconds=1), "rate limited")
    add(store, job("after"))
    assert started(admission.claim(store, governor(), A, RUNNERS, {})) == []
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE runnerstate SET cooldown_until = :t"), {"t": utcnow() - timedelta(seconds=1)})
    assert started(admission.claim(store, governor(), A, RUNNERS, {})) == ["after"]


def test_a_waiting_retry_job_holds_its_workspace_and_resumes_first_on_its_own_host(store):
    add(store, job("w", workspace="/w/x"), job("later", workspace="/w/x"), job("other"))
    assert store.claim("host-a", ["/w"], 8, 2**34).id == "w"
    store.transition("w", Status.running, Status.waiting_retry, retry_at=utcnow() + timedelta(minutes=5),
                     resume_session="conv-1")
    assert store.get("w").workspace_lock == "/w/x"  # waiting keeps the workspace: its upper dir is kept
    plan = admission.claim(store, governor(1.0), A, RUNNERS, {})
    assert started(plan) == ["other"]  # "later" may not take the kept workspace; "w" is not due yet
    store.update_job("w", retry_at=utcnow() - timedelta(seconds=1))
    assert store.claim("host-b", ["/w"], 8, 2**34) is None  # due, but its upper dir is on host-a
    resumed = store.claim("host-a", ["/w"], 8, 2**34)
    assert (resumed.id, resumed.status, resumed.attempts, resumed.resume_session) == ("w", Status.running, 2,
                                                                                      "conv-1")


def test_permits_are_exact_and_released_once(store):
    add(store, job("a"), job("b"))
    gov = governor(2.0)
    plan = admission.claim(store, gov, A, RUNNERS, {})
    assert [p.cpus for _, p in plan.starts] == [1.0, 1.0] and gov.reserved_cpus == 2.0
    for _, permit in plan.starts:
        gov.release(permit)
        gov.release(permit)  # a second release frees nothing more
    assert gov.reserved_cpus == 0.0


# ------------------------------------------------------------------------------------------ hosts


def test_a_job_under_a_root_only_host_b_holds_is_never_claimed_by_host_a(store):
    add(store, job("b-only", workspace="/srv/b/repo"), job("shared", workspace="/w/s"),
        job("lookalike", workspace="/srv/bb/repo"), job("prefix", workspace="/srv/b"))
    host_a = admission.Host("host-a", ("/w", "/srv/a"))
    plan = admission.claim(store, governor(8.0), host_a, RUNNERS, {})
    assert started(plan) == ["shared"]
    assert store.get("b-only").status == Status.queued and store.head("host-a", ["/w", "/srv/a"]) is None
    plan = admission.claim(store, governor(8.0), admission.Host("host-b", ("/srv/b",)), RUNNERS, {})
    assert started(plan) == ["b-only", "prefix"]  # /srv/bb is not under /srv/b
    assert store.get("b-only").host_id == "host-b"


def test_a_host_whose_root_is_the_whole_file_system_claims_any_absolute_workspace(store):
    add(store, job("deep", workspace="/srv/b/repo"))
    plan = admission.claim(store, governor(8.0), admission.Host("host-all", ("/",)), RUNNERS, {})
    assert started(plan) == ["deep"] and store.get("deep").host_id == "host-all"


def test_a_cooldown_is_extended_never_shortened_even_by_hosts_setting_it_at_once(store, db_url):
    now = utcnow()
    ends = [now + timedelta(seconds=s) for s in (30, 90, 60, 10, 75, 45)]
    barrier = threading.Barrier(len(ends))
    errors: list[Exception] = []

    def host(until) -> None:
        mine = Store(db_url)
        barrier.wait()
        try:
            mine.cool_down("shared", until, f"429 until {until:%H:%M:%S}")
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=host, args=(until,)) for until in ends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = store.runner_states()["shared"]
    assert state.cooldown_until == max(ends) and state.reason == f"429 until {max(ends):%H:%M:%S}"
    store.cool_down("shared", now + timedelta(seconds=5), "a shorter one")
    assert store.runner_states()["shared"].cooldown_until == max(ends)


def test_no_job_is_claimed_twice_by_racing_hosts(store, db_url):
    add(store, *[job(f"j{i:03d}") for i in range(60)])
    claims: dict[str, list[str]] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def host(name: str) -> None:
        mine = Store(db_url)
        barrier.wait()
        while (claimed := mine.claim(name, ["/w"], 1.0, 2**31)) is not None:
            with lock:
                claims.setdefault(claimed.id, []).append(name)
        mine.close()

    threads = [threading.Thread(target=host, args=(f"h{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claims) == [f"j{i:03d}" for i in range(60)]
    assert all(len(hosts) == 1 for hosts in claims.values()), {k: v for k, v in claims.items() if len(v) > 1}
    assert store.counts() == {Status.running: 60}


def test_one_workspace_is_never_held_by_two_hosts(store):
    add(store, job("first", workspace="/w/one"), job("second", workspace="/w/one"))
    assert store.claim("host-a", ["/w"], 8, 2**34).id == "first"
    assert store.claim("host-b", ["/w"], 8, 2**34) is None
    with pytest.raises(IntegrityError):  # the unique index refuses a second holder, whoever asks
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE job SET workspace_lock = '/w/one' WHERE id = 'second'"))
    store.transition("first", Status.running, Status.rolled_back, reason="agent_error")
    assert store.get("first").workspace_lock is None  # settling gives the workspace up
    assert store.claim("host-b", ["/w"], 8, 2**34).id == "second"


# ------------------------------------------------------------------------------------------ lost hosts


def test_a_lost_hosts_running_job_is_taken_over_only_by_a_host_with_its_root(store):
    register(store, "host-a")
    register(store, "host-b", roots=("/w",))
    register(store, "host-c", roots=("/elsewhere",))
    add(store, job("lost-run"))
    assert store.claim("host-a", ["/w"], 8, 2**34).id == "lost-run"
    store.start_attempt("lost-run", 1, "host-a")
    assert store.mark_lost(60) == ([], [])  # host-a beats: nothing is lost
    silence(store, "host-a")
    lost, marked = store.mark_lost(60)
    assert lost == ["host-a"] and marked == [("lost-run", "host-a")]
    assert store.get("lost-run").interrupted_at is not None and store.get("lost-run").status == Status.running
    assert store.orphans("host-c", ["/elsewhere"], 60) == []  # host-c does not hold /w
    (orphan,) = store.orphans("host-b", ["/w"], 60)
    requeued = store.take_over(orphan, "host-b", 60)
    assert (requeued.status, requeued.host_id, requeued.reason) == (Status.queued, None, "interrupted")
    assert requeued.workspace_lock is None and "host-a was lost" in requeued.error
    lost_attempt = store.attempts("lost-run")[0]
    assert (lost_attempt.outcome, lost_attempt.status, lost_attempt.reason) == ("host_lost", "interrupted", "host_lost")
    # the lost host's attempt, still running somewhere, can move the job nowhere any more
    with pytest.raises(IllegalTransition):
        Phase(Status.running, owner=("host-a", 1)).move(store, requeued, Status.testing)
    again = store.claim("host-b", ["/w"], 8, 2**34)
    assert (again.id, again.host_id, again.attempts) == ("lost-run", "host-b", 2)
    with pytest.raises(IllegalTransition):  # not even after host-b claimed it: the attempt number differs
        Phase(Status.running, owner=("host-a", 1)).move(store, again, Status.testing)


def test_a_lost_hosts_attempt_in_its_tests_ends_interrupted_keeping_its_agents_outcome(store):
    register(store, "host-a")
    register(store, "host-b")
    add(store, job("lost-testing"))
    store.claim("host-a", ["/w"], 8, 2**34)
    attempt = store.start_attempt("lost-testing", 1, "host-a")
    store.finish_attempt(attempt.id, outcome="success", exit_code=0)  # its agent ended; its tests ran
    store.transition("lost-testing", Status.running, Status.testing)
    silence(store, "host-a")
    store.mark_lost(60)
    (orphan,) = store.orphans("host-b", ["/w"], 60)
    assert store.take_over(orphan, "host-b", 60).status == Status.queued
    ended = store.attempts("lost-testing")[0]
    assert (ended.status, ended.reason, ended.outcome) == ("interrupted", "host_lost", "success")


def test_a_committing_job_of_a_lost_host_waits_for_that_host(store):
    register(store, "host-a")
    register(store, "host-b")
    add(store, job("applying"))
    assert store.claim("host-a", ["/w"], 8, 2**34).id == "applying"
    store.transition("applying", Status.running, Status.testing)
    store.transition("applying", Status.testing, Status.committing)
    silence(store, "host-a")
    assert store.mark_lost(60)[1] == [("applying", "host-a")]  # marked, so people see why it waits
    assert store.orphans("host-b", ["/w"], 60) == []  # but never taken over: its upper dir is on host-a
    stale = store.get("applying")
    assert store.take_over(stale, "host-b", 60) is None  # even when asked directly
    assert store.get("applying").status == Status.committing and store.get("applying").host_id == "host-a"


def test_a_host_that_comes_back_keeps_its_jobs(store):
    register(store, "host-a")
    register(store, "host-b")
    add(store, job("back"))
    assert store.claim("host-a", ["/w"], 8, 2**34).id == "back"
    silence(store, "host-a")
    store.mark_lost(60)
    (orphan,) = store.orphans("host-b", ["/w"], 60)
    store.beat("host-a", 1.0, 2**30, 1, None)  # host-a beats again before host-b acts
    assert store.take_over(orphan, "host-b", 60) is None
    assert store.reclaim("host-a") == ["back"]
    job_row = store.get("back")
    assert (job_row.status, job_row.host_id, job_row.interrupted_at) == (Status.running, "host-a", None)
    Phase(Status.running, owner=("host-a", 1)).move(store, job_row, Status.testing)  # its own moves still work


def test_a_job_waiting_on_a_lost_host_is_requeued_from_clean(store):
    register(store, "host-a")
    register(store, "host-b")
    add(store, job("waits"))
    store.claim("host-a", ["/w"], 8, 2**34)
    store.transition("waits", Status.running, Status.waiting_retry, retry_at=utcnow(), resume_session="conv")
    silence(store, "host-a")
    store.mark_lost(60)
    (orphan,) = store.orphans("host-b", ["/w"], 60)
    requeued = store.take_over(orphan, "host-b", 60)
    assert (requeued.status, requeued.resume_session, requeued.workspace_lock) == (Status.queued, None, None)


def test_a_second_executor_under_a_live_host_id_is_refused(store, tmp_path):
    import os
    import socket

    from executor.errors import ConfigError
    from executor.scheduling.hosting import Presence
    from executor.settings import Settings

    settings = Settings(home=tmp_path / "home", policies=tmp_path, workspace_roots=["/w"],
                        database_url=store.url, host_id="twin")
    live = os.getppid()  # a process that runs on this machine and is not this one
    store.register_host(Host(id="twin", version="test", machine=socket.gethostname(), pid=live, budget_cpus=1,
                             budget_memory=2**30, reserve_memory=2**28))
    with pytest.raises(ConfigError, match="in use by a live executor"):
        Presence(settings, store, lambda: {}).register()
    store.register_host(Host(id="twin", version="test", machine=socket.gethostname(), pid=2**22 + 7,
                             budget_cpus=1, budget_memory=2**30, reserve_memory=2**28))
    Presence(settings, store, lambda: {}).register()  # its process is gone: a restart after a crash
    assert store.hosts()[0].pid == os.getpid()
