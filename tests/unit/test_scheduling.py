"""Scheduling logic without an engine: settling from the phase the caller knows, the judgement of agent and
test runs, the liveness watchdog on a fake clock, and the serving loop on a fake deployment. Admission (the
claim from the shared queue) is tests/unit/test_claim.py, on both engines. The integration tier proves the
same behaviours on the real engine."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from executor.agent.claude_code.stream import StreamState
from executor.agent.events import Event
from executor.agent.outcome import Outcome
from executor.errors import (
    AgentFailed,
    ApiError,
    Cancelled,
    DiskReserve,
    IllegalTransition,
    Interrupted,
    ModelMismatch,
    OutOfMemory,
    RateLimited,
    Stalled,
    TestsFailed,
    TestsOutOfMemory,
    TestsTimedOut,
    TimedOut,
)
from executor.job.judge import judge_agent, judge_tests
from executor.policy import Policy, Runner
from executor.sandbox.liveness import Watchdog
from executor.sandbox.runtime import AgentRun, TestRun
from executor.scheduling import admission
from executor.scheduling.governor import Governor
from executor.settings import parse_size
from executor.store import Job, Status, Store
from executor.transaction.commit import Ending, Phase, settle
from executor.transaction.workspace import Workspace
from tests.unit.fakes import FakeDeployment

ROOT = Path(__file__).resolve().parents[2]

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
RUNNER = Runner(name="r", model="claude-sonnet-4-5", auth_env="T")


def job(job_id: str, *, cpus: float = 1.0, runner: str = "r", workspace: str | None = None,
        status: Status = Status.queued, **fields) -> Job:
    fields.setdefault("session_id", job_id)
    return Job(id=job_id, runner=runner, model_requested="m",
               workspace=workspace or f"/w/{job_id}", prompt="p", policy_name="default",
               policy=Policy(cpus=cpus, memory="512m").model_dump(), status=status, **fields)


def governor(cpus: float = 2.0) -> Governor:
    return Governor(cpus, parse_size("64g"), parse_size("256m"))


HOST = admission.Host("h1", ("/w",))


def reasons(queue, holding=(), *, gov=None, cooling=(), saturated=(), base_hosts=None, now=NOW):
    return admission.reasons(list(queue), list(holding), HOST, gov or governor(), set(cooling), set(saturated),
                             base_hosts or {}, now)


# ------------------------------------------------------------------------------- why a queued job waits


def test_the_head_that_does_not_fit_is_named_and_those_behind_it_say_so():
    gov = governor(2.0)
    assert gov.try_reserve("running", Policy(cpus=1.0)) is not None
    held = reasons([job("big", cpus=2.0), job("small", cpus=1.0)], gov=gov)
    assert "cpus" in held["big"] and held["small"] == "behind job big, which waits for room in the budget"


def test_cooldown_concurrency_and_busy_workspaces_and_sessions_are_named_and_do_not_block_the_line():
    holding = [job("holder", workspace="/w/shared", status=Status.running),
               job("first", workspace="/w/a", session_id="sess", status=Status.running)]
    held = reasons([job("cool", runner="cooling"), job("busy", workspace="/w/shared"),
                    job("limited2", runner="limited"), job("second", session_id="sess"), job("free")],
                   holding, cooling={"cooling"}, saturated={"limited"})
    assert held == {"cool": "runner cooling is cooling down after a rate limit",
                    "busy": "job holder holds the workspace /w/shared",
                    "limited2": "runner limited already runs its max_concurrent jobs on this host",
                    "second": "job first of the same session sess runs first",
                    "free": "starts at the next claim round"}


def test_a_waiting_retry_says_when_and_jobs_of_other_hosts_say_whose_they_are():
    waiting = job("w", status=Status.waiting_retry, workspace="/w/x", retry_at=NOW + timedelta(minutes=5),
                  host_id="h1")
    held = reasons([waiting, job("later", workspace="/w/x"), job("outside", workspace="/srv/other"),
                    job("theirs", status=Status.waiting_retry, host_id="h2"),
                    job("revision", builds_on="base")], [waiting], base_hosts={"base": "h2"})
    assert held == {"w": "retries after a rate limit at 12:05:00 UTC",
                    "later": "job w holds the workspace /w/x",
                    "outside": "its workspace is under none of this host's roots: a host that holds it runs it",
                    "theirs": "it waits to retry on host h2",
                    "revision": "the change it revises is kept on host h2, which runs it"}


# --------------------------------------------------------------------------------------------- settle


@pytest.fixture
def stored(tmp_path: Path):
    store = Store(tmp_path / "executor.db")
    store.add_job(job("s1", workspace=str(tmp_path / "repo")))
    ws = Workspace(job_id="s1", attempt=1, repo=tmp_path / "repo", root=tmp_path / "jobs" / "s1", uid=0, gid=0)
    ws.upper.mkdir(parents=True)
    yield store, ws
    store.close()


def test_settle_moves_the_job_from_the_phase_its_owner_knows(stored):
    store, ws = stored
    phase = Phase(Status.queued)
    phase.move(store, store.get("s1"), Status.running)
    deployment = FakeDeployment()
    settled = settle(store, store.get("s1"), ws, Ending.of(AgentFailed("no")), phase, deployment)
    assert settled.status == Status.rolled_back and settled.reason == "agent_error"
    assert ("remove_job_objects", "s1") in deployment.calls
    assert not ws.root.exists()  # rolled back: the job dir went before the status said so


def test_a_racing_cancel_wins_and_settle_does_not_overwrite_it(stored):
    store, ws = stored
    phase = Phase(Status.queued)
    job_row = phase.move(store, store.get("s1"), Status.running)
    store.transition("s1", Status.running, Status.cancelled, reason="cancelled")  # someone else, first
    with pytest.raises(IllegalTransition):
        settle(store, job_row, ws, Ending.of(AgentFailed("no")), phase, FakeDeployment())
    assert store.get("s1").status == Status.cancelled


def test_a_job_awaiting_review_is_claimed_before_its_change_is_removed(stored):
    store, ws = stored
    store.transition("s1", Status.queued, Status.running)
    store.transition("s1", Status.running, Status.testing)
    store.transition("s1", Status.testing, Status.awaiting_review)
    store.transition("s1", Status.awaiting_review, Status.committing)  # another reviewer approved it first
    with pytest.raises(IllegalTransition):
        settle(store, store.get("s1"), ws, Ending(Status.rolled_back, "rejected"), Phase(Status.awaiting_review))
    assert ws.upper.is_dir(), "the loser removed the winner's change"


def test_an_ending_takes_reason_status_and_keeping_from_its_error():
    from executor.errors import Conflict

    ending = Ending.of(Conflict(["a.txt"]))
    assert (ending.status, ending.reason, ending.keep_upper) == (Status.failed, "conflict", True)
    assert Ending.of(Interrupted("stop")).status == Status.queued
    assert Ending.of(TestsTimedOut("slow")).status == Status.rolled_back


# -------------------------------------------------------------------------------------------- judging


def run_of(kind: str = "success", *, models: tuple[str, ...] = ("claude-sonnet-4-5",), **fields) -> AgentRun:
    state = StreamState()
    state.models_seen = list(models)
    return AgentRun(outcome=Outcome(kind, "msg"), state=state, exit_code=0, **fields)


@pytest.mark.parametrize("run, error", [
    (run_of(stopped="shutdown"), Interrupted),
    (run_of(stopped="cancelled"), Cancelled),
    (run_of(stopped="stalled"), Stalled),
    (run_of(stopped="timeout"), TimedOut),
    (run_of(oom_killed=True), OutOfMemory),
    (run_of(models=("claude-sonnet-4-5", "claude-haiku-4-5")), ModelMismatch),
    (run_of("agent_error"), AgentFailed),
    (run_of("rate_limited"), RateLimited),
    (run_of("api_error"), ApiError),
])
def test_an_agent_run_that_did_not_earn_its_tests_raises_why(run, error):
    with pytest.raises(error) as raised:
        judge_agent(RUNNER, Policy(), run)
    assert type(raised.value) is error or issubclass(type(raised.value), error)


def test_a_successful_run_earns_its_tests_and_the_synthetic_model_is_not_a_mismatch():
    assert judge_agent(RUNNER, Policy(), run_of(models=("claude-sonnet-4-5", "<synthetic>"))) is None


def test_a_model_refused_at_the_gateway_fails_the_run_naming_both_models():
    with pytest.raises(ModelMismatch) as raised:
        judge_agent(RUNNER, Policy(), run_of(stopped="model_mismatch"), refused=["claude-opus-5-5"])
    message = str(raised.value)
    assert message.startswith("r failed: ModelMismatch:")
    assert "'claude-sonnet-4-5'" in message and "'claude-opus-5-5'" in message and "refused" in message
    with pytest.raises(Cancelled):  # a person's cancel still says what happened
        judge_agent(RUNNER, Policy(), run_of(stopped="cancelled"), refused=["claude-opus-5-5"])


def test_a_stall_with_retry_stalled_goes_back_to_the_queue():
    with pytest.raises(Stalled) as raised:
        judge_agent(RUNNER, Policy(retry_stalled=True), run_of(stopped="stalled", last_activity="tool call Bash"))
    assert Ending.of(raised.value).status == Status.queued
    assert "tool call Bash" in str(raised.value) and "retry_stalled" in str(raised.value)


@pytest.mark.parametrize("tests, error", [
    (TestRun("t", 1, ""), TestsFailed),
    (TestRun("t", None, "", timed_out=True), TestsTimedOut),
    (TestRun("t", 137, "", oom_killed=True), TestsOutOfMemory),
    (TestRun("t", None, "", stopped="cancelled"), Cancelled),
    (TestRun("t", None, "", stopped="shutdown"), Interrupted),
    (TestRun("t", None, "", stopped="disk_reserve"), DiskReserve),
])
def test_a_test_run_that_did_not_pass_raises_why(tests, error):
    with pytest.raises(error):
        judge_tests(tests)
    assert judge_tests(TestRun("t", 0, "")) is None


# ------------------------------------------------------------------------------------------- watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeContainer:
    """Answers the two engine calls a heartbeat makes: stats and the pids cgroup read."""

    def __init__(self) -> None:
        self.cpu_ns = 0

    def stats(self, stream: bool, one_shot: bool) -> dict:
        return {"cpu_stats": {"cpu_usage": {"total_usage": self.cpu_ns}}, "memory_stats": {"usage": 1 << 20},
                "pids_stats": {"current": 3}}

    def exec_run(self, cmd, stdout: bool, stderr: bool):
        class Result:
            exit_code = 0
            output = b"max 0\n"
        return Result()


def watchdog(**policy) -> tuple[Watchdog, Clock, list]:
    clock, beats = Clock(), []
    dog = Watchdog(Policy(heartbeat_interval=30, stall_after=300, **policy), on_beat=beats.append, clock=clock)
    return dog, clock, beats


def test_silence_for_the_stall_window_is_a_stall_and_each_interval_beats_once():
    dog, clock, beats = watchdog()
    container = FakeContainer()
    dog.start(container)
    for _ in range(9):
        clock.now += 30
        assert dog.check(container) is None
    clock.now += 30
    assert dog.check(container) == "stalled"
    assert len(beats) == 10 and all(b.state == "idle" for b in beats)


def test_stream_lines_and_real_cpu_work_are_progress_but_timer_noise_is_not():
    dog, clock, beats = watchdog(stall_cpu_threshold=0.05)
    container = FakeContainer()
    dog.start(container)
    clock.now += 30
    dog.saw_line([Event("tool_call", {"name": "Bash", "command": "make"})], "")
    assert dog.check(container) is None and beats[-1].state == "progress"
    assert dog.last_activity == "tool call Bash: make"
    for _ in range(20):  # ten minutes of a silent build at half a core: alive
        clock.now += 30
        container.cpu_ns += int(0.5 * 1e9 * 30)
        assert dog.check(container) is None and beats[-1].state == "progress"
    for _ in range(9):  # then a CLI waiting on its timers (0.3 % of a core): idle, not yet stalled
        clock.now += 30
        container.cpu_ns += int(0.003 * 1e9 * 30)
        assert dog.check(container) is None and beats[-1].state == "idle"
    clock.now += 30
    assert dog.check(container) == "stalled"


def test_a_fresh_container_counts_its_cpu_from_zero_and_an_adopted_one_from_when_it_was_adopted():
    for fresh, state in ((True, "progress"), (False, "idle")):
        dog, clock, beats = watchdog(stall_cpu_threshold=0.05)
        container = FakeContainer()
        container.cpu_ns = int(20 * 1e9)  # twenty CPU seconds used before the watchdog started
        dog.start(container, fresh=fresh)
        clock.now += 30
        assert dog.check(container) is None
        assert beats[-1].state == state, (fresh, beats[-1])


def test_a_wait_the_cli_announced_is_not_a_stall():
    dog, clock, _ = watchdog()
    container = FakeContainer()
    dog.start(container)
    dog.saw_line([Event("api_retry", {"error_status": 429, "retry_delay_ms": 600_000})], "")
    clock.now += 500
    assert dog.check(container) is None and dog.waiting_api
    clock.now += 500
    assert dog.check(container) == "stalled"


def test_gateway_activity_from_another_thread_is_progress_and_pings_only_is_not_a_stall():
    import threading

    dog, clock, beats = watchdog()
    container = FakeContainer()
    dog.start(container)
    for _ in range(20):  # ten minutes of an answer that only pings: the gateway sees it move, the CLI prints nothing
        clock.now += 30
        pinger = threading.Thread(target=dog.saw_activity)  # the gateway's loop thread
        pinger.start()
        pinger.join()
        assert dog.check(container) is None and beats[-1].state == "api_streaming"
    for _ in range(9):
        clock.now += 30
        assert dog.check(container) is None and beats[-1].state == "idle"
    clock.now += 30
    assert dog.check(container) == "stalled"  # silence for stall_after after the last ping


def test_a_heartbeat_that_cannot_be_written_does_not_stop_the_job():
    clock = Clock()

    def broken(beat):
        raise RuntimeError("database is gone")

    dog = Watchdog(Policy(heartbeat_interval=30, stall_after=300), on_beat=broken, clock=clock)
    container = FakeContainer()
    dog.start(container)
    clock.now += 31
    assert dog.check(container) is None and dog.last_beat is not None


# ------------------------------------------------------------------------- the loop, on a fake engine


def test_the_serving_loop_admits_within_the_budget_and_frees_slots(tmp_path, monkeypatch):
    """The loop's tick on a fake deployment: two 1-cpu jobs of three run under a 2-cpu budget, the third
    waits and says why, and starts once a slot is reaped."""
    import threading

    from executor.scheduling import service
    from executor.settings import Settings

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "T"\n')
    settings = Settings(home=tmp_path / "home", policies=policies, workspace_roots=["/w"], budget_cpus=2.0,
                        budget_memory="8g")
    release = threading.Event()
    ran: list[str] = []

    def fake_run_job(ctx, job_id):  # settles the claimed job as the pipeline would, without a container
        ran.append(job_id)
        assert ctx.store.get(job_id).status == Status.running  # the claim moved it
        release.wait(10)
        ctx.store.transition(job_id, Status.running, Status.rolled_back, reason="agent_error")

    monkeypatch.setattr(service, "run_job", fake_run_job)
    executor = service.Executor(settings, {}, deployment=FakeDeployment())
    for name in ("a", "b", "c"):
        executor.store.add_job(job(name))
    executor.tick()
    assert sorted(executor.slots) == ["a", "b"] and "job c waits" in executor.waiting
    status = executor.status()
    assert status["reserved"]["cpus"] == 2.0 and [r["job"] for r in status["running"]] == ["a", "b"]
    release.set()
    for slot in list(executor.slots.values()):
        slot.thread.join(5)
    executor.tick()
    assert list(executor.slots) == ["c"] and sorted(ran) == ["a", "b", "c"] and executor.waiting is None
    for slot in list(executor.slots.values()):
        slot.thread.join(5)
    executor.store.close()


def _executor(tmp_path, monkeypatch, run_job, deployment=None, **settings):
    from executor.scheduling import service
    from executor.settings import Settings

    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "T"\n')
    monkeypatch.setattr(service, "run_job", run_job)
    settings = Settings(home=tmp_path / "home", policies=policies, workspace_roots=["/w"], **settings)
    return service.Executor(settings, {}, deployment=deployment or FakeDeployment())


def test_a_dead_side_thread_stops_the_executor_loudly(tmp_path, monkeypatch):
    import threading

    from executor.errors import InternalError

    executor = _executor(tmp_path, monkeypatch, lambda ctx, job_id: None)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()

    class Notifier:
        thread = dead

    executor.notifier = Notifier()
    with pytest.raises(InternalError, match="notifier"):
        executor.check_side_threads()
    executor.store.close()


def test_the_sealed_sandbox_threads_are_side_threads_whose_death_stops_the_executor(tmp_path, monkeypatch):
    from executor.errors import InternalError

    executor = _executor(tmp_path, monkeypatch, lambda ctx, job_id: None)
    assert executor.side_threads() == {}  # not started before serve()
    executor.sealer.start()
    assert {"sandbox event loop", "sandbox recorder"} <= set(executor.side_threads())
    executor.check_side_threads()
    executor.sealer.recorder.stop()
    with pytest.raises(InternalError, match="sandbox recorder"):
        executor.check_side_threads()
    executor.shutdown(grace=0.1)
    assert not executor.sealer.loop.thread.is_alive()


def test_shutdown_removes_what_outlives_the_grace_and_waits_for_it_before_closing_the_store(tmp_path, monkeypatch):
    """A job thread that does not stop by itself within the grace is cut off (its containers removed), and
    the store closes only after the thread has returned."""
    import threading

    removed = threading.Event()
    finished = []

    class Deployment(FakeDeployment):
        def remove_job_objects(self, job_id: str) -> None:
            super().remove_job_objects(job_id)
            removed.set()

    def stubborn(ctx, job_id):
        removed.wait(30)  # an agent that only ends when its container goes
        ctx.store.get(job_id)  # still uses the store: it must be open
        finished.append(job_id)

    deployment = Deployment()
    executor = _executor(tmp_path, monkeypatch, stubborn, deployment)
    executor.store.add_job(job("stuck"))
    executor.tick()
    assert "stuck" in executor.slots
    executor.shutdown(grace=0.2)
    assert ("remove_job_objects", "stuck") in deployment.calls
    assert finished == ["stuck"] and not executor.slots


def test_the_loop_wakes_when_a_job_file_lands_or_a_slot_frees(tmp_path):
    from executor.intake.spool import Spool
    from executor.scheduling.wakeup import Wakeup

    spool = Spool(tmp_path / "spool")
    wakeup = Wakeup(spool.incoming)
    try:
        assert wakeup.wait(0.05) is False  # nothing happened: the poll interval passes
        spool.write(b"{}")  # written in tmp/, renamed into incoming/
        assert wakeup.wait(5) is True  # True: woken by the landing, not by the timeout passing
        assert wakeup.wait(0.05) is False  # drained: one landing wakes the loop once
        wakeup.wake()  # a job thread freed its slot
        assert wakeup.wait(5) is True
    finally:
        wakeup.close()


def test_new_work_committed_to_a_sqlite_store_by_another_process_wakes_the_loop(tmp_path):
    """``executor review request-changes`` or a page in another process inserts a job: the serving loop's
    wait ends at its commit (the store's wake file)."""
    import subprocess
    import sys

    from executor.scheduling.wakeup import Wakeup

    store = Store(tmp_path / "executor.db")
    wakeup = Wakeup(tmp_path / "no-spool", store.wake_path)
    try:
        assert wakeup.watching == {"store"}  # the spool directory is missing: that one is polled
        assert wakeup.wait(0.05) is False
        code = ("import sys; from pathlib import Path; from executor.store import Store; "
                "from tests.unit.test_scheduling import job; Store(Path(sys.argv[1])).add_job(job('other'))")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "executor.db")], check=True, cwd=ROOT)
        assert wakeup.wait(30) is True  # True: woken by the other process's commit, not the timeout
        assert store.get("other").status == Status.queued  # committed before the wake
        assert wakeup.wait(0.05) is False  # drained
    finally:
        wakeup.close()
        store.close()


def test_an_idle_loop_waits_longer_and_a_busy_one_polls(tmp_path, monkeypatch):
    from executor.scheduling import service

    executor = _executor(tmp_path, monkeypatch, run_job=lambda ctx, job_id: None)
    assert executor.wakeup.watching == {"spool", "store"}
    assert executor.presence.announced  # SQLite: new work wakes it, so it need not look at every tick
    executor.tick()
    assert executor.pause() == service.IDLE_WAIT > executor.settings.poll_interval
    executor.waiting = "job x waits: cpus"  # the head of its queue waits for room: poll for it
    assert executor.pause() == executor.settings.poll_interval
    executor.waiting = None
    executor.presence.store_watched = False  # nothing announces new work: every tick looks
    assert executor.pause() == executor.settings.poll_interval and executor.presence.claim_due()


def test_the_disk_reserve_check_reads_the_watchdogs_while_job_threads_come_and_go(tmp_path, monkeypatch):
    """Job threads add and remove their watchdogs while the serving loop looks for the largest writer: on a
    plain dict that loop died of "dictionary changed size during iteration"."""
    import sys
    import threading

    from executor.sandbox.disk import DiskMeter
    from tests.conftest import wait_for

    executor = _executor(tmp_path, monkeypatch, run_job=lambda ctx, job_id: None)
    executor.governor.disk_reserve = 2**60  # below the reserve, always: every call looks at the writers
    stop = threading.Event()
    errors: list[BaseException] = []

    def job_threads(offset: int) -> None:
        dogs = []
        for n in range(200):
            dog = Watchdog(Policy(), on_beat=lambda beat: None, disk=DiskMeter(1))
            dog.disk.bytes = n
            dogs.append(dog)
        while not stop.is_set():
            for n, dog in enumerate(dogs):
                executor.ctx.watchdogs[f"job-{offset}-{n}"] = dog
            for n in range(len(dogs)):
                executor.ctx.watchdogs.pop(f"job-{offset}-{n}", None)

    threads = [threading.Thread(target=job_threads, args=(i,)) for i in range(2)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch every few bytecodes: the race shows within a few calls
    for thread in threads:
        thread.start()
    stops = 0
    try:
        wait_for(lambda: len(executor.ctx.watchdogs) > 0, 30, "the job threads to register watchdogs", interval=0.01)
        for _ in range(3000):
            try:
                executor.keep_disk_reserve()
            except RuntimeError as exc:
                errors.append(exc)
                break
            stops += len(executor.ctx.stop_requests) > 0
            executor.ctx.stop_requests = type(executor.ctx.stop_requests)()  # the stop was taken: look again
    finally:
        sys.setswitchinterval(switch)
        stop.set()
        for thread in threads:
            thread.join(10)
        executor.store.close()
    assert errors == []
    assert stops > 0, "the check never found a writer to stop while the job threads came and went"
