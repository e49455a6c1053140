"""The real Codex CLI 0.169.0 in the real sandbox image, end to end through the spool, sealed: its API calls
go through the job's gateway to a scripted Responses API (``tests/scripted_responses.py``, SSE streaming), the
credential swapped in there and the answering model read from the answers. A job that writes a file and
passes its tests commits; a failing test rolls back; an answer from another model fails ``model_mismatch``
and commits nothing; a 429 backs off against the same runner and fails naming it; a second job of the session
continues the first's thread."""

from __future__ import annotations

import json

from executor.agent.codex.command import PLACEHOLDER_CREDENTIAL
from executor.sandbox.deployment import LABEL_INSTANCE, instance_id
from executor.store import Status
from tests.conftest import TOKEN_VALUE, tree_digest, wait_for, wait_status
from tests.scripted_responses import RTurn, ScriptedResponses

def _mine(world) -> str:
    """This test's executor's containers (another test session on the engine may run the same job ids)."""
    return f"{LABEL_INSTANCE}={instance_id(world.home)}"


SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
MODEL = "gpt-5-codex"


def _codex_runner(world, api: ScriptedResponses) -> None:
    world.write_runners(api.base_url, models={"codex": MODEL}, agent='"codex"')


def _run(world, run_executor, job_id: str, script: list[RTurn], repo, **policy):
    with ScriptedResponses({job_id: script}) as api:
        _codex_runner(world, api)
        world.write_policy(**policy)
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id=job_id, runner="codex", workspace=str(repo), prompt=f"{job_id}: do it")
        job = wait_status(store, job_id, SETTLED, timeout=180)
        return job, store, api.requests


def test_a_codex_job_runs_a_shell_command_and_commits_its_change(world, run_executor, docker_client):
    repo = world.repo("cx", {"README": "codex\n"})
    script = {"cx-ok": [RTurn.shell(f"cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep -c {TOKEN_VALUE} ; "
                                    "echo hello > hello.txt && cat README"),
                        RTurn.text("Wrote hello.txt.")]}
    with ScriptedResponses(script) as api:
        _codex_runner(world, api)
        world.write_policy(test_command="grep -qx hello hello.txt")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="cx-ok", runner="codex", workspace=str(repo), prompt="cx-ok: write hello.txt")
        container = wait_for(lambda: next(iter(docker_client.containers.list(
            filters={"label": ["io.executor.job=cx-ok", "io.executor.role=agent", _mine(world)]})), None), 60, "the agent container")
        config = container.attrs["Config"]
        job = wait_status(store, "cx-ok", SETTLED, timeout=180)
        requests = api.requests
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert (repo / "hello.txt").read_text() == "hello\n"
    assert job.agent == "codex" and job.models_seen == [MODEL]
    # the real CLI ran: its own argv, the gateway as its provider's base URL, a placeholder for the credential
    assert "codex" in config["Cmd"] and "exec" in config["Cmd"] and "--json" in config["Cmd"]
    assert 'model_providers.executor.base_url="http://127.0.0.1:8080/v1"' in config["Cmd"]
    assert f"OPENAI_API_KEY={PLACEHOLDER_CREDENTIAL}" in config["Env"]
    assert TOKEN_VALUE not in json.dumps(container.attrs)
    # the API saw the real credential on every request, never the placeholder; the model asked was the runner's
    assert len(requests) == 2 and all(r.path == "/v1/responses" for r in requests)
    assert all(r.headers["authorization"] == f"Bearer {TOKEN_VALUE}" for r in requests)
    assert all(PLACEHOLDER_CREDENTIAL not in json.dumps(r.headers) for r in requests)
    assert {r.body["model"] for r in requests} == {MODEL} and all(r.body["stream"] is True for r in requests)
    # the command's output went back to the model: no process in the container held the credential
    output = next(i["output"] for i in requests[1].body["input"] if i.get("type") == "function_call_output")
    assert "codex" in output and "\n0\n" in f"\n{output}\n".replace("Output:\n", "\n")
    # the stream became the executor's events; usage per request is what the API answered
    events = store.events(job_id="cx-ok")
    calls = [e.data for e in events if e.kind == "tool_call"]
    assert calls and calls[0]["name"] == "command_execution" and "hello.txt" in calls[0]["command"]
    assert any(e.kind == "tool_result" and not e.data["is_error"] for e in events)
    assert any(e.kind == "turn" and e.data["text"] == "Wrote hello.txt." for e in events)
    rows = store.api_requests(job_id="cx-ok")
    assert [(r.status, r.path, r.model, r.runner) for r in rows] == [(200, "/v1/responses", MODEL, "codex")] * 2
    for row, request in zip(rows, requests):
        assert {k: getattr(row, k) for k in request.usage} == request.usage
    attempt = store.attempts("cx-ok")[-1]
    assert attempt.outcome == "success" and attempt.agent_session_id


def test_a_codex_job_whose_tests_fail_rolls_back(world, run_executor):
    repo = world.repo("cxf", {"README": "codex\n"})
    before = tree_digest(repo)
    job, _, requests = _run(world, run_executor, "cx-fail", [RTurn.shell("echo bad > bad.txt"), RTurn.text("Done.")],
                            repo, test_command="test ! -f bad.txt")
    assert (job.status, job.reason) == (Status.rolled_back, "tests_failed"), (job.reason, job.error)
    assert len(requests) == 2 and tree_digest(repo) == before


def test_an_answer_from_another_model_fails_model_mismatch_and_commits_nothing(world, run_executor):
    repo = world.repo("cxm")
    before = tree_digest(repo)
    job, store, requests = _run(world, run_executor, "cx-swap",
                                [RTurn.shell("echo x > x.txt", model="gpt-4o-mini")] * 4, repo)
    assert (job.status, job.reason) == (Status.failed, "model_mismatch"), (job.reason, job.error)
    assert "gpt-4o-mini" in job.error and MODEL in job.error and job.error.startswith("codex failed:")
    assert tree_digest(repo) == before  # the answer was cut before the CLI saw its command
    refused = [e.data for e in store.events(job_id="cx-swap") if e.kind == "gateway_refused"]
    assert refused and refused[0]["kind"] == "answer"


def test_a_codex_job_rate_limited_on_every_attempt_fails_naming_the_runner(world, run_executor):
    repo = world.repo("cxr")
    before = tree_digest(repo)
    limit = RTurn.error(429, "rate_limit_exceeded", "Rate limit reached for requests", {"retry-after": "0"})
    job, store, requests = _run(world, run_executor, "cx-rl", [limit] * 20, repo, cli_max_retries=0,
                                backoff_initial="1s", backoff_multiplier=2, max_attempts=2)
    assert (job.status, job.reason) == (Status.failed, "rate_limited"), (job.reason, job.error)
    assert job.error.startswith("codex failed: rate limited after 2 attempts: ")
    assert job.attempts == 2 and tree_digest(repo) == before
    events = store.rate_limits(job_id="cx-rl")
    assert events and {(e.runner, e.status_code, e.kind) for e in events} == {("codex", 429, "rate_limited")}
    assert {r.headers["authorization"] for r in requests} == {f"Bearer {TOKEN_VALUE}"}


def test_a_second_codex_job_of_the_session_continues_the_thread(world, run_executor):
    repo = world.repo("cxs", {"README": "codex\n"})
    script = {"cx-first": [RTurn.shell("echo one > one.txt"), RTurn.text("FIRST-ANSWER-5521")],
              "cx-second": [RTurn.shell("echo two > two.txt"), RTurn.text("Done.")]}
    with ScriptedResponses(script) as api:
        _codex_runner(world, api)
        world.write_policy(test_command="test -f one.txt", context="resume")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="cxs-1", session_id="cxs", runner="codex", workspace=str(repo), prompt="cx-first: one")
        first = wait_status(store, "cxs-1", SETTLED, timeout=180)
        assert first.status == Status.succeeded, (first.reason, first.error)
        world.submit(id="cxs-2", session_id="cxs", runner="codex", workspace=str(repo), prompt="cx-second: two")
        second = wait_status(store, "cxs-2", SETTLED, timeout=180)
        requests = api.requests
    assert second.status == Status.succeeded, (second.reason, second.error)
    assert (repo / "one.txt").exists() and (repo / "two.txt").exists()
    thread = store.attempts("cxs-1")[-1].agent_session_id
    assert thread and store.attempts("cxs-2")[-1].agent_session_id == thread
    resumed = json.dumps(requests[-1].body["input"])
    assert "FIRST-ANSWER-5521" in resumed and "cx-second: two" in resumed


def test_doctor_finds_each_configured_runners_cli_in_the_image(docker_client):
    from executor.policy import Runner
    from executor.surfaces.doctor_agents import clis
    from tests.conftest import SANDBOX_IMAGE

    runners = {"c": Runner(name="c", model="m", auth_env="T"), "x": Runner(name="x", agent="codex", model=MODEL,
                                                                          auth_env="T"),
               "g": Runner(name="g", agent="gemini", model="gemini-2.5-pro", auth_env="T")}
    found = clis(docker_client, SANDBOX_IMAGE, runners, {"io.executor.test": "doctor-clis"})
    assert found.status == "ok" and "claude 2.1.328" in found.detail and "codex codex-cli 0.169.0" in found.detail
    assert "gemini 0.61.0" in found.detail
    assert docker_client.containers.list(all=True, filters={"label": "io.executor.test=doctor-clis"}) == []
