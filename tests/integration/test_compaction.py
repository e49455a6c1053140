"""Follow-up jobs of a session through the spool, on the real engine and CLI: the scripted API plays the
coding agent and, at the same endpoint (the runner's ``base_url``, with the runner's credential), the small
model. The second job starts from the session brief (not the first job's raw tool results), or from the
structural brief when the small model keeps answering 429, or continues the first job's conversation in
``resume`` mode."""

from __future__ import annotations

import json

from executor.store import Status
from tests.conftest import TOKEN_VALUE, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
NOTES = "RAW-NOTES-CONTENT-7781: the parser keeps a cache\n"
FIRST = [
    Turn.tool("Read", {"file_path": "/workspace/notes.txt"}),
    Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": "out\n"}),
    Turn.tool("Bash", {"command": "cat notes.txt out.txt", "description": "show"}),
    Turn.text("Done: wrote out.txt.\nOpen items:\n- document the cache"),
]
SUMMARY = "- notes.txt: design notes of the parser\n- mattered: the cache"
SMALL = "claude-haiku-4-5-20251001"  # the pinned default of EXECUTOR_COMPACTION_MODEL


def _two_jobs(world, run_executor, small_model: Turn, settings: dict | None = None, skills=None, **policy):
    script = {"cmp-first": FIRST, "cmp-second": [Turn.text("Done: nothing else to do.")]}
    with ScriptedAPI(script, models={SMALL: small_model}) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f out.txt", **policy)
        repo = world.repo("cmp", {"notes.txt": NOTES})
        running = run_executor(world.settings(**(settings or {})))
        store = running.executor.store
        world.submit(id="cmp-1", session_id="sess", workspace=str(repo), prompt="cmp-first: write out.txt")
        first = wait_status(store, "cmp-1", SETTLED, timeout=120)
        assert first.status == Status.succeeded, (first.reason, first.error)
        if skills:
            (world.policies / "skills").mkdir(exist_ok=True)
            for name in skills:
                (world.policies / "skills" / f"{name}.md").write_text(f"# The {name} skill\nSKILL-BODY-{name}\n")
        world.submit(id="cmp-2", session_id="sess", workspace=str(repo), prompt="cmp-second: go on",
               **({"skills": skills} if skills else {}))
        second = wait_status(store, "cmp-2", SETTLED, timeout=120)
        requests = [r for r in api.conversation if r.key == "cmp-second"]
        everything = [r for r in api.conversation]
        small_calls = [r for r in api.requests if r.is_messages and r.body.get("model") == SMALL]
    # the runner's own credential (this SDK sends an API key as a bearer token)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN_VALUE}" for r in small_calls)
    return store, second, requests, everything, small_calls


def _system_text(request) -> str:
    system = request.body.get("system")
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    return str(system or "")


def test_second_job_starts_from_the_brief_not_the_raw_history(world, run_executor):
    store, second, requests, _, small_calls = _two_jobs(world, run_executor, Turn.text(SUMMARY))
    assert second.status == Status.succeeded, (second.reason, second.error)
    assert second.compaction == "model"
    first_request = requests[0]
    system = _system_text(first_request)
    assert "# Session brief: session sess, 1 earlier job(s)" in system
    assert "notes.txt (read by cmp-1):" in system and "mattered: the cache" in system
    assert "out.txt: changed by cmp-1 (committed)" in system
    assert "- document the cache" in system and "`test -f out.txt`" in system
    body = json.dumps(first_request.body)
    assert "RAW-NOTES-CONTENT-7781" not in body  # the first job's tool result is not carried
    assert len(first_request.body["messages"]) == 1  # a fresh conversation
    assert small_calls and {r.body["model"] for r in small_calls} == {SMALL}
    rows = store.compactions(job_id="cmp-2")
    assert sorted((r.kind, r.subject) for r in rows) == [("file", "notes.txt"), ("settled_job", "cmp-1")]
    for row in rows:
        assert row.session_id == "sess" and row.model == SMALL and row.event_ids
        assert row.source_size > 0 and row.summary_size > 0 and row.cost_usd > 0 and row.latency is not None
    event = [e.data for e in store.events(job_id="cmp-2") if e.kind == "compaction"][0]
    assert event["mode"] == "model" and event["brief"] in system


def test_small_model_out_of_retries_starts_with_the_structural_brief(world, run_executor):
    limit = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit")
    store, second, requests, _, small_calls = _two_jobs(world, run_executor, limit,
                                                        settings={"compaction_attempts": 2, "compaction_backoff": 0.1})
    assert second.status == Status.succeeded, (second.reason, second.error)
    assert second.compaction.startswith(f"structural: {SMALL} answered 429 after 2 attempts")
    assert len(small_calls) == 2 * 2  # two items, two attempts each, the same model
    system = _system_text(requests[0])
    assert f"structural, without model summaries ({SMALL} answered 429" in system
    assert "- notes.txt (read by cmp-1)" in system and "RAW-NOTES-CONTENT-7781" not in json.dumps(requests[0].body)
    assert all(r.model is None for r in store.compactions(job_id="cmp-2"))


def test_resume_mode_continues_the_previous_conversation(world, run_executor):
    store, second, _, everything, small_calls = _two_jobs(world, run_executor, Turn.text(SUMMARY), skills=["style"],
                                                          context="resume")
    assert second.status == Status.succeeded, (second.reason, second.error)
    assert second.compaction == "resume" and small_calls == []
    # the resumed conversation starts with the first job's prompt: its requests are keyed "cmp-first"
    resumed = everything[-1]
    body = json.dumps(resumed.body["messages"])
    assert "RAW-NOTES-CONTENT-7781" in body and "cmp-second: go on" in body
    # the skill it names rides along in full, in the prompt: a resumed conversation keeps its system prompt
    assert "SKILL-BODY-style" in body and "SKILL-BODY-style" not in _system_text(resumed)
    first_attempt = store.attempts("cmp-1")[-1]
    started = [e.data for e in store.events(job_id="cmp-2") if e.kind == "compaction"][0]
    assert {k: started[k] for k in ("mode", "agent_session_id", "previous_job")} == {
        "mode": "resume", "agent_session_id": first_attempt.agent_session_id, "previous_job": "cmp-1"}
