"""The real Gemini CLI 0.61.0 (on Node.js 22) in the real sandbox image, end to end through the spool, sealed:
its calls go through the job's gateway to a scripted Gemini API (``tests/scripted_gemini.py``, SSE), the
credential swapped in there (``x-goog-api-key``) and the answering model read from ``modelVersion``."""

from __future__ import annotations

import json

from executor.agent.gemini.command import PLACEHOLDER_CREDENTIAL
from executor.sandbox.deployment import LABEL_INSTANCE, instance_id
from executor.store import Status
from tests.conftest import TOKEN_VALUE, tree_digest, wait_for, wait_status
from tests.scripted_gemini import GTurn, ScriptedGemini

def _mine(world) -> str:
    """This test's executor's containers (another test session on the engine may run the same job ids)."""
    return f"{LABEL_INSTANCE}={instance_id(world.home)}"


SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
MODEL = "gemini-2.5-pro"


def _run(world, run_executor, job_id: str, script: list[GTurn], repo, docker_client=None, **policy):
    with ScriptedGemini({job_id: script}) as api:
        world.write_runners(api.base_url, models={"gem": MODEL}, agent='"gemini"')
        world.write_policy(**policy)
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id=job_id, runner="gem", workspace=str(repo), prompt=f"{job_id}: do it")
        attrs = None
        if docker_client is not None:
            container = wait_for(lambda: next(iter(docker_client.containers.list(
                filters={"label": [f"io.executor.job={job_id}", "io.executor.role=agent", _mine(world)]})), None), 60, "the agent")
            attrs = container.attrs
        job = wait_status(store, job_id, SETTLED, timeout=180)
        return job, store, api.requests, attrs


def test_a_gemini_job_runs_a_shell_command_and_commits_its_change(world, run_executor, docker_client):
    repo = world.repo("gm", {"README": "gemini\n"})
    job, store, requests, attrs = _run(world, run_executor, "gm-ok",
                                       [GTurn.shell(f"cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep -c {TOKEN_VALUE}; "
                                                    "echo hello > hello.txt"), GTurn.text("Wrote hello.txt.")], repo,
                                       docker_client, test_command="grep -qx hello hello.txt")
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert (repo / "hello.txt").read_text() == "hello\n"
    assert job.agent == "gemini" and job.models_seen == [MODEL]
    assert f"GEMINI_API_KEY={PLACEHOLDER_CREDENTIAL}" in attrs["Config"]["Env"]
    assert "GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:8080" in attrs["Config"]["Env"]
    assert TOKEN_VALUE not in json.dumps(attrs)
    assert len(requests) == 2 and {r.model for r in requests} == {MODEL}
    assert all(r.headers["x-goog-api-key"] == TOKEN_VALUE for r in requests)
    events = store.events(job_id="gm-ok")
    call = next(e.data for e in events if e.kind == "tool_call")
    assert call["name"] == "run_shell_command" and "hello.txt" in call["command"]
    result = next(e.data for e in events if e.kind == "tool_result")
    assert result["content"].strip() == "0"  # no process in the container held the credential
    rows = store.api_requests(job_id="gm-ok")
    assert [(r.status, r.model, r.runner) for r in rows] == [(200, MODEL, "gem")] * 2
    assert all(r.input_tokens and r.output_tokens for r in rows)


def test_a_gemini_job_whose_tests_fail_rolls_back(world, run_executor):
    repo = world.repo("gmf")
    before = tree_digest(repo)
    job, _, _, _ = _run(world, run_executor, "gm-fail", [GTurn.shell("echo bad > bad.txt"), GTurn.text("Done.")],
                        repo, test_command="test ! -f bad.txt")
    assert (job.status, job.reason) == (Status.rolled_back, "tests_failed"), (job.reason, job.error)
    assert tree_digest(repo) == before


def test_an_answer_from_another_gemini_model_fails_model_mismatch(world, run_executor):
    repo = world.repo("gmm")
    before = tree_digest(repo)
    job, store, _, _ = _run(world, run_executor, "gm-swap", [GTurn.shell("echo x > x.txt", model="gemini-2.5-flash")] * 4,
                            repo)
    assert (job.status, job.reason) == (Status.failed, "model_mismatch"), (job.reason, job.error)
    assert "gemini-2.5-flash" in job.error and tree_digest(repo) == before


def test_a_gemini_job_rate_limited_on_every_attempt_fails_naming_the_runner(world, run_executor):
    repo = world.repo("gmr")
    before = tree_digest(repo)
    limit = GTurn.error(429, "Resource has been exhausted (e.g. check quota).")
    job, store, requests, _ = _run(world, run_executor, "gm-rl", [limit] * 20, repo, cli_max_retries=0,
                                   backoff_initial="1s", backoff_multiplier=2, max_attempts=2)
    assert (job.status, job.reason) == (Status.failed, "rate_limited"), (job.reason, job.error)
    assert job.error.startswith("gem failed: rate limited after 2 attempts: ")
    assert job.attempts == 2 and tree_digest(repo) == before
    events = store.rate_limits(job_id="gm-rl")
    assert events and {(e.runner, e.status_code, e.kind) for e in events} == {("gem", 429, "rate_limited")}
    assert 2 <= len(requests) <= 4  # general.maxAttempts = cli_max_retries + 1: no ten retries over minutes


def test_a_second_gemini_job_of_the_session_starts_from_the_brief(world, run_executor):
    repo = world.repo("gms", {"README": "gemini\n"})
    # the second job's prompt holds the brief, which names the first job's prompt: its key is matched first
    script = {"gm-second": [GTurn.shell("echo two > two.txt"), GTurn.text("Done.")],
              "gm-first": [GTurn.shell("echo one > one.txt"), GTurn.text("Done.")]}
    with ScriptedGemini(script) as api:
        world.write_runners(api.base_url, models={"gem": MODEL}, agent='"gemini"')
        world.write_policy(test_command="test -f one.txt")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="gms-1", session_id="gms", runner="gem", workspace=str(repo), prompt="gm-first: one")
        first = wait_status(store, "gms-1", SETTLED, timeout=180)
        assert first.status == Status.succeeded, (first.reason, first.error)
        world.submit(id="gms-2", session_id="gms", runner="gem", workspace=str(repo), prompt="gm-second: two")
        second = wait_status(store, "gms-2", SETTLED, timeout=180)
        requests = api.requests
    assert second.status == Status.succeeded, (second.reason, second.error)
    assert (repo / "two.txt").exists()
    # the brief (structural: a gemini runner has no small model yet) leads the second job's prompt
    prompt = json.dumps(requests[-1].body["contents"][0])
    assert "Session brief" in prompt and "gms-1" in prompt and "gm-second: two" in prompt
    started = [e.data for e in store.events(job_id="gms-2") if e.kind == "compaction"][0]
    assert started["mode"] == "structural" and "gemini" in started["reason"]
