"""The Codex agent's parts without the engine: its stream (real transcripts of Codex 0.169.0) in the executor's
events, how a run ended, its command line and environment, and the Responses API as its gateway reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor.agent.codex.agent import CODEX
from executor.agent.codex.api import RESPONSES, duration
from executor.agent.codex.command import PLACEHOLDER_CREDENTIAL
from executor.agent.events import parse_line
from executor.agent.registry import agent_for
from executor.agent.seam import LaunchRequest
from executor.policy import Policy, Runner

FIXTURES = Path(__file__).parent.parent / "fixtures" / "codex-stream"
RUNNER = Runner(name="cx", agent="codex", model="gpt-5-codex", auth_env="OPENAI_KEY")


def _read(name: str):
    run = CODEX.run()
    events = []
    for line in (FIXTURES / name).read_bytes().splitlines():
        events += run.feed(parse_line(line))
    return run, events


def test_a_real_stream_becomes_the_executors_events():
    run, events = _read("shell-success.jsonl")
    kinds = [e.kind for e in events]
    assert kinds[0] == "init" and events[0].data["session_id"] == run.session_id
    call = next(e.data for e in events if e.kind == "tool_call")
    result = next(e.data for e in events if e.kind == "tool_result")
    assert call["name"] == "command_execution" and "hello.txt" in call["command"]
    assert result == {"tool_use_id": call["id"], "is_error": False, "exit_code": 0, "content": "hi\n"}
    assert kinds.count("tool_call") == 1  # started and completed are one call
    assert run.ended and run.final_text == "done" and run.models_seen == []
    assert (run.input_tokens, run.output_tokens) == (200, 40) and run.cost_usd is None
    assert CODEX.classify(run, 0).kind == "success"
    assert CODEX.tool_action("command_execution") == "shell" and CODEX.tool_action("file_change") == "edit"


@pytest.mark.parametrize("name, kind, status", [("429.jsonl", "rate_limited", 429), ("401.jsonl", "auth_error", 401),
                                                ("failed.jsonl", "api_error", None)])
def test_a_failed_turn_is_classified_by_what_it_says(name, kind, status):
    run, events = _read(name)
    outcome = CODEX.classify(run, 1)
    assert outcome.kind == kind, outcome
    assert run.ended and (status is None or run.error_statuses[-1] == status)
    assert any(e.kind == "api_retry" for e in events) and events[-1].kind == "result"


def test_a_warning_item_does_not_fail_a_run_and_no_end_is_an_agent_error():
    run = CODEX.run()
    run.feed({"type": "item.completed", "item": {"id": "i", "type": "error", "message": "Model metadata not found"}})
    assert not run.ended and CODEX.classify(run, 1).kind == "agent_error"
    assert "without finishing its turn" in CODEX.classify(run, 1).message


def test_only_a_thread_id_is_kept_from_the_stream():
    run = CODEX.run()
    run.feed({"type": "thread.started", "thread_id": "--dangerously-bypass-hook-trust"})
    assert run.session_id is None  # it would be an option on the next job's command line
    run.feed({"type": "thread.started", "thread_id": "01a24f96-ca19-7742-8909-72acabf4fa03"})
    assert run.session_id == "01a24f96-ca19-7742-8909-72acabf4fa03"


def test_the_sealed_command_line_names_the_gateway_and_holds_no_credential():
    launch = CODEX.launch(LaunchRequest("-rm everything", RUNNER, Policy(cli_max_retries=3), {"OPENAI_KEY": "sk-REAL"},
                                        sealed=True, system="SYSTEM-NOTE", resume="01a24f96-ca19-7742-8909-72acabf4fa03"))
    argv = launch.argv
    assert argv[:3] == ["codex", "exec", "resume"] and argv[-2:] == ["--", "-rm everything"]
    assert argv[-3] == "01a24f96-ca19-7742-8909-72acabf4fa03"
    assert argv[argv.index("-m") + 1] == "gpt-5-codex"
    assert 'model_providers.executor.base_url="http://127.0.0.1:8080/v1"' in argv
    assert "model_providers.executor.request_max_retries=3" in argv
    for feature in ("unbounded_connection_retries", "enable_request_compression", "plugins"):
        assert argv[argv.index(feature) - 1] == "--disable"
    assert 'developer_instructions="SYSTEM-NOTE"' in argv
    assert launch.environment["OPENAI_API_KEY"] == PLACEHOLDER_CREDENTIAL
    assert "sk-REAL" not in json.dumps([argv, launch.environment]) and launch.files == {}
    unsealed = CODEX.launch(LaunchRequest("p", RUNNER, Policy(), {"OPENAI_KEY": "sk-REAL"}, sealed=False))
    assert unsealed.environment["OPENAI_API_KEY"] == "sk-REAL"
    assert 'model_providers.executor.base_url="https://api.openai.com/v1"' in unsealed.argv


def test_a_runner_names_its_agent():
    assert agent_for(RUNNER) is CODEX and agent_for(Runner(name="c", model="m", auth_env="T")).name == "claude-code"
    with pytest.raises(ValueError, match="/v1"):
        Runner(name="x", agent="codex", model="m", auth_env="T", base_url="http://127.0.0.1:9")


def test_the_gateway_reads_a_streamed_answer_its_usage_and_model():
    meter = RESPONSES.meter("text/event-stream")
    created = {"type": "response.created", "response": {"id": "r", "model": "gpt-5-codex", "usage": None}}
    delta = {"type": "response.output_text.delta", "delta": "x" * 100}
    done = {"type": "response.completed", "response": {"id": "r", "model": "gpt-5-codex", "usage": {
        "input_tokens": 120, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 7}}}
    body = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (created, delta, done))
    for i in range(0, len(body), 17):  # in pieces, as it streams past
        meter.feed(body[i:i + 17])
    assert meter.model == "gpt-5-codex"
    assert meter.finish() == {"input_tokens": 100, "cache_read_input_tokens": 20, "output_tokens": 7}
    assert RESPONSES.checks_answers  # the stream never names the model: the gateway cuts another's answer


def test_the_responses_protocol_routes_errors_and_rate_limits():
    assert RESPONSES.route("POST", "/v1/responses") is not None
    assert RESPONSES.route("GET", "/v1/models") is None and RESPONSES.route("POST", "/v1/chat/completions") is None
    assert RESPONSES.forward_path("/v1/responses", "") == "/responses"  # the base URL ends in /v1
    assert RESPONSES.auth_headers("sk-REAL", "api_key") == {"authorization": "Bearer sk-REAL"}
    status, headers, body = RESPONSES.error(400, "invalid_request_error", "model refused")
    assert status == 400 and json.loads(body)["error"]["message"] == "model refused"
    spent = RESPONSES.meter("application/json")
    spent.feed(json.dumps({"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}})
               .encode())
    spent.finish()
    assert RESPONSES.weather(429, spent) is None and RESPONSES.weather(429, None) == "rate_limited"
    headers = {"retry-after-ms": "1500", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
               "x-ratelimit-reset-tokens": "250ms", "content-type": "application/json"}
    reading = RESPONSES.reading(headers)
    assert (reading.retry_after, reading.requests_remaining, reading.requests_reset, reading.tokens_reset) == (
        1.5, 0, 360.0, 0.25)
    assert "content-type" not in RESPONSES.rate_limit_headers(headers)
    assert duration("1h2m3.5s") == 3723.5 and duration("soon") is None


def test_a_codex_runner_has_no_small_model_yet_and_says_so():
    from executor.errors import CompactionUnavailable
    from executor.settings import Settings

    with pytest.raises(CompactionUnavailable, match="structural brief"):
        CODEX.summarizer(Settings(), {"OPENAI_KEY": "k"}, RUNNER.model_copy(update={"compaction_model": "gpt-5-mini"}))
