"""Runner discipline on the real engine and CLI: rate limits are weather (back off, same runner,
resume), failure names the runner, and the model that answered is checked."""

from __future__ import annotations

import json

from executor.clock import aware
from executor.store import Status
from tests.conftest import tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
LIMIT = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "0"})
FAST_RETRY = dict(cli_max_retries=0, backoff_initial="1s", backoff_multiplier=2, max_attempts=4)



def test_rate_limited_twice_then_succeeds_on_the_same_runner(world, run_executor):
    script = {"rl-ok": [LIMIT, LIMIT, Turn.tool("Write", {"file_path": "/workspace/ok.txt", "content": "ok\n"}),
                        Turn.text("Done.")]}
    with ScriptedAPI(script) as api, ScriptedAPI(default=Turn.text("never")) as other:
        world.write_runners(api.base_url)
        runners = (world.policies / "runners.toml").read_text()
        (world.policies / "runners.toml").write_text(runners + f'''
[runners.other]
model = "claude-haiku-4-5"
auth_env = "TEST_RUNNER_TOKEN"
base_url = "{other.base_url}"
''')
        world.write_policy(test_command="test -f ok.txt", **FAST_RETRY)
        repo = world.repo("rl")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="rl-ok", workspace=str(repo), prompt="rl-ok: write ok.txt")
        job = wait_status(store, "rl-ok", SETTLED, timeout=180)
        conversation = api.conversation
        assert other.requests == []  # no other runner was touched
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert job.attempts == 3
    assert (repo / "ok.txt").read_text() == "ok\n"
    events = store.rate_limits(job_id="rl-ok")
    assert [(e.runner, e.status_code, e.kind) for e in events] == [("scripted", 429, "rate_limited")] * 2
    assert [e.retry_delay for e in events] == [1.0, 2.0]  # backoff_initial, then x backoff_multiplier
    attempts = store.attempts("rl-ok")
    assert [a.outcome for a in attempts] == ["rate_limited", "rate_limited", "success"]
    for earlier, later, delay in zip(attempts, attempts[1:], (1.0, 2.0)):
        assert (aware(later.started_at) - aware(earlier.finished_at)).total_seconds() >= delay - 0.05
    assert {r.body["model"] for r in conversation} == {"claude-sonnet-4-5"}
    assert job.models_seen == ["claude-sonnet-4-5"]


def test_rate_limited_on_every_attempt_fails_naming_the_runner(world, run_executor):
    with ScriptedAPI({"rl-never": [LIMIT] * 10}) as api:
        world.write_runners(api.base_url)
        world.write_policy(**{**FAST_RETRY, "max_attempts": 3})
        repo = world.repo("never")
        before = tree_digest(repo)
        running = run_executor(world.settings())
        world.submit(id="rl-never", workspace=str(repo), prompt="rl-never: try")
        job = wait_status(running.executor.store, "rl-never", SETTLED, timeout=180)
    assert job.status == Status.failed and job.reason == "rate_limited"
    assert job.error.startswith("scripted failed: rate limited after 3 attempts: ")
    assert "rate limit" in job.error.lower()
    assert job.attempts == 3
    assert tree_digest(repo) == before
    assert not (world.home / "jobs" / "rl-never").exists()


def test_cooldown_holds_the_runner_but_not_the_others(world, run_executor):
    script = {"cool-a1": [LIMIT, Turn.text("Done.")], "cool-a2": [Turn.text("Done.")],
              "cool-b1": [Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url, models={"runner-a": "claude-sonnet-4-5", "runner-b": "claude-haiku-4-5"})
        world.write_policy(**{**FAST_RETRY, "backoff_initial": "8s"})
        running = run_executor(world.settings(budget_cpus=3.0))
        store = running.executor.store
        world.submit(id="cool-a1", runner="runner-a", workspace=str(world.repo("a1")), prompt="cool-a1: go")
        a1 = wait_status(store, "cool-a1", {Status.waiting_retry} | SETTLED, timeout=120)
        assert a1.status == Status.waiting_retry, (a1.reason, a1.error)
        retry_at = aware(a1.retry_at)
        world.submit(id="cool-a2", runner="runner-a", workspace=str(world.repo("a2")), prompt="cool-a2: go")
        world.submit(id="cool-b1", runner="runner-b", workspace=str(world.repo("b1")), prompt="cool-b1: go")
        b1 = wait_status(store, "cool-b1", SETTLED, timeout=120)
        assert b1.status == Status.succeeded
        assert aware(b1.finished_at) < retry_at  # runner B ran while A cooled down
        a2 = wait_status(store, "cool-a2", SETTLED, timeout=120)
        a1 = wait_status(store, "cool-a1", SETTLED, timeout=120)
    assert a1.status == a2.status == Status.succeeded
    assert aware(a2.started_at) >= retry_at  # A's second job waited for the cooldown
    assert [e.runner for e in store.rate_limits()] == ["runner-a"]


def test_status_shows_a_runner_cooling_down(world, run_executor):
    with ScriptedAPI({"cool-s": [LIMIT, Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        world.write_policy(**{**FAST_RETRY, "backoff_initial": "20s"})
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="cool-s", workspace=str(world.repo("s")), prompt="cool-s: go")
        wait_status(store, "cool-s", Status.waiting_retry, timeout=120)
        view = wait_for(lambda: [r for r in running.executor.status()["runners"] if r["state"] != "ok"], 10,
                        "the runner to show its cooldown")
        store.request_cancel("cool-s")
    assert view[0]["runner"] == "scripted" and view[0]["state"].startswith("cooling down until")
    assert view[0]["waiting"] == 1


def test_a_different_model_answering_fails_the_job(world, run_executor):
    script = {"swap": [Turn.tool("Write", {"file_path": "/workspace/x.txt", "content": "x\n"}, model="claude-haiku-9-9"),
                       Turn.text("Done.", model="claude-haiku-9-9")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        repo = world.repo("swap")
        before = tree_digest(repo)
        running = run_executor(world.settings())
        world.submit(id="swap", workspace=str(repo), prompt="swap: write")
        job = wait_status(running.executor.store, "swap", SETTLED, timeout=120)
    assert (job.status, job.reason) == (Status.failed, "model_mismatch")
    assert "ModelMismatch" in job.error and "claude-sonnet-4-5" in job.error and "claude-haiku-9-9" in job.error
    assert job.error.startswith("scripted failed:")
    assert "claude-haiku-9-9" in job.models_seen
    assert tree_digest(repo) == before


def test_retry_after_a_rate_limit_resumes_the_conversation_and_keeps_the_work(world, run_executor):
    script = {"resume-me": [
        Turn.tool("Write", {"file_path": "/workspace/first.txt", "content": "from attempt one\n"}),
        LIMIT,
        Turn.tool("Write", {"file_path": "/workspace/second.txt", "content": "from attempt two\n"}),
        Turn.text("Done."),
    ]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f first.txt && test -f second.txt", **FAST_RETRY)
        repo = world.repo("resume")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="resume-me", workspace=str(repo), prompt="resume-me: write two files")
        job = wait_status(store, "resume-me", SETTLED, timeout=180)
        conversation = api.conversation
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert job.attempts == 2
    assert (repo / "first.txt").read_text() == "from attempt one\n"
    assert (repo / "second.txt").read_text() == "from attempt two\n"
    # the second attempt's first request carries the first attempt's conversation (the Write tool call)
    resumed = conversation[2]
    body = json.dumps(resumed.body["messages"])
    assert "first.txt" in body and "from attempt one" in body
    assert "interrupted by an API rate limit" in body
    attempts = store.attempts("resume-me")
    assert attempts[0].agent_session_id and attempts[1].outcome == "success"
    running_events = [e.data for e in store.events(job_id="resume-me") if e.kind == "state" and e.data.get("status") == "running"]
    assert running_events[1]["resume"] == attempts[0].agent_session_id


def test_a_job_waiting_on_the_clis_own_retry_is_not_stalled(world, run_executor):
    slow_limit = Turn.error(429, "rate_limit_error", "rate limited", {"retry-after": "8"})
    script = {"patient": [slow_limit, Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cli_max_retries=1, heartbeat_interval="1s", stall_after="4s")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="patient", workspace=str(world.repo("patient")), prompt="patient: wait for it")
        job = wait_status(store, "patient", SETTLED, timeout=120)
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert any(e.kind == "api_retry" for e in store.events(job_id="patient"))
    states = [b.state for b in store.heartbeats("patient")]
    assert "waiting_api" in states  # the heartbeat recorded the wait, and the stall rule held off
