"""Tests for executor.agent (events, stream state, outcome, usage limits): real CLI transcripts end to end, plus small synthetic streams shaped
like them for the endings the fixtures do not cover (auth error, 529, spend cap, usage limits)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from executor.agent.claude_code.events import SYNTHETIC_MODEL, Event, events_for, parse_line
from executor.agent.claude_code.outcome import Outcome, classify
from executor.agent.claude_code.stream import StreamState
from executor.agent.claude_code.usage_limit import looks_like_usage_limit, parse_usage_limit
from executor.errors import AgentFailed, Overloaded, RateLimited

# Real transcripts of CLI 2.1.328 (tests/fixtures/claude-stream/README.md says how they were captured).
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "claude-stream"

# Thursday 2026-11-26 10:00 UTC: a fixed "now" for every relative reset time.
NOW = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
SESSION = "11111111-2222-3333-4444-555555555555"


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing")
    return path


def run_fixture(name: str) -> tuple[StreamState, list[Event]]:
    state = StreamState(clock=lambda: NOW)
    events: list[Event] = []
    for raw in fixture_path(name).read_bytes().splitlines():
        events.extend(state.feed(parse_line(raw)))
    return state, events


def run_lines(lines: list[dict | str]) -> StreamState:
    state = StreamState(clock=lambda: NOW)
    for line in lines:
        raw = line if isinstance(line, str) else json.dumps(line)
        state.feed_raw(raw)
    return state


# -- synthetic lines, modeled on the real fixture shapes ----------------------------------------


def init(model: str = "claude-opus-5-5") -> dict:
    return {
        "type": "system",
        "subtype": "init",
        "cwd": "/workspace",
        "session_id": SESSION,
        "tools": ["Bash", "Edit", "Read", "Write"],
        "model": model,
        "claude_code_version": "2.1.328",
    }


def api_retry(status: int, error: str, attempt: int = 1, delay_ms: int = 1000) -> dict:
    return {
        "type": "system",
        "subtype": "api_retry",
        "attempt": attempt,
        "max_retries": 2,
        "retry_delay_ms": delay_ms,
        "error_status": status,
        "error": error,
        "session_id": SESSION,
    }


def assistant(content: list[dict], model: str = "claude-opus-5-5", **extra: object) -> dict:
    return {
        "type": "assistant",
        "message": {"id": "msg_1", "model": model, "role": "assistant", "content": content,
                    "usage": {"input_tokens": 10, "output_tokens": 1}},
        "parent_tool_use_id": None,
        "session_id": SESSION,
        **extra,
    }


def api_error_line(text: str, error: str, status: int, error_type: str) -> dict:
    """The CLI's own error message: synthetic model, ``error`` set, as in rate-limit-429.jsonl."""
    return assistant(
        [{"type": "text", "text": text}],
        model=SYNTHETIC_MODEL,
        error=error,
        is_api_error_message=True,
        api_error_status=status,
        api_error_type=error_type,
    )


def result(text: str = "Done.", is_error: bool = False, terminal_reason: str = "completed",
           subtype: str = "success", **extra: object) -> dict:
    return {
        "type": "result",
        "subtype": subtype,
        "is_error": is_error,
        "terminal_reason": terminal_reason,
        "num_turns": 1,
        "duration_ms": 100,
        "total_cost_usd": 0,
        "usage": {"input_tokens": 0, "output_tokens": 0},
        "session_id": SESSION,
        "result": text,
        **extra,
    }


def error_result(text: str, status: int, error_type: str) -> dict:
    return result(text, is_error=True, terminal_reason="api_error",
                  api_error_status=status, api_error_type=error_type)


# -- the real fixtures ---------------------------------------------------------------------------


def test_success_write_fixture_end_to_end():
    state, events = run_fixture("success-write.jsonl")

    assert state.claude_session_id == "03864cda-57ef-41fa-b7d9-eba36b6e5fb7"
    assert state.init_model == "claude-opus-5-5"
    assert state.models_seen == ["claude-opus-5-5"]
    assert state.lines == 5 and state.partial_lines == 0
    assert state.final_text == "Done."
    assert state.result is not None and state.result["num_turns"] == 2
    assert [e.kind for e in events] == ["init", "tool_call", "tool_result", "turn", "result"]

    init_event = events[0]
    assert init_event.data["claude_code_version"] == "2.1.328"
    assert init_event.data["cwd"] == "/workspace"
    assert init_event.data["tools"] == 22

    write = events[1]
    assert write.data["name"] == "Write"
    assert write.data["id"] == "toolu_w0"
    assert write.data["file_path"] == "/workspace/hello.txt"
    # the file's content stays out of the event
    assert "hello from the scripted model" not in json.dumps(write.data)

    assert events[2].data["tool_use_id"] == "toolu_w0"
    assert events[2].data["is_error"] is False
    assert events[3].data["text"] == "Done."
    assert events[4].data["terminal_reason"] == "completed"
    assert events[4].data["total_cost_usd"] > 0

    outcome = classify(state, 0)
    assert outcome.kind == "success"
    assert outcome.to_error() is None


def test_partial_fixture_counts_partial_lines_but_yields_the_same_events():
    state, events = run_fixture("success-write-partial.jsonl")
    plain_state, plain_events = run_fixture("success-write.jsonl")

    assert state.partial_lines == 12
    assert state.lines == 19
    # stream_event lines are heartbeats only: the meaningful events are the same as without them
    meaningful = [e.kind for e in events if e.kind != "other"]
    assert meaningful == [e.kind for e in plain_events]
    assert state.models_seen == ["claude-opus-5-5"]
    assert state.claude_session_id == "46b5ade5-526c-4f71-8673-38e642f7f90b"
    assert classify(state, 0).kind == "success"


def test_stream_event_lines_yield_no_events():
    raw = fixture_path("success-write-partial.jsonl").read_text().splitlines()
    partial = [parse_line(r) for r in raw if '"stream_event"' in r]
    assert partial and all(events_for(msg) == [] for msg in partial)


def test_rate_limit_429_fixture_is_rate_limited_with_retry_after():
    state, events = run_fixture("rate-limit-429.jsonl")

    assert state.claude_session_id == "aa1b06fc-b102-4487-ac30-3355e3afcc91"
    # the CLI's synthetic error message is not a model that answered
    assert state.models_seen == ["claude-opus-5-5"]
    assert SYNTHETIC_MODEL not in state.models_seen
    assert [r["attempt"] for r in state.api_retries] == [1, 2]
    assert all(r["error_status"] == 429 for r in state.api_retries)
    assert state.assistant_errors == ["rate_limit"]
    assert "per-minute rate limit" in state.final_text
    assert [e.kind for e in events].count("api_retry") == 2

    outcome = classify(state, 1)
    assert outcome.kind == "rate_limited"
    assert outcome.retry_after == pytest.approx(1.171)  # the last api_retry's retry_delay_ms
    assert "Request rejected (429)" in outcome.message
    assert outcome.to_error().retryable
    error = outcome.to_error()
    assert isinstance(error, RateLimited) and error.retry_after == pytest.approx(1.171)


def test_model_swap_fixture_sees_both_models():
    state, events = run_fixture("model-swap.jsonl")

    assert state.init_model == "claude-opus-5-5"
    assert state.models_seen == ["claude-opus-5-5", "claude-haiku-5-5"]
    assert {e.data["model"] for e in events if e.kind in ("turn", "tool_call")} == {"claude-haiku-5-5"}
    # the CLI still calls it a success: deciding on the mismatch is the caller's job
    assert classify(state, 0).kind == "success"


# -- lines and events ----------------------------------------------------------------------------


def test_parse_line_blank_json_and_plain_text():
    assert parse_line(b"") is None
    assert parse_line("   \n") is None
    assert parse_line(b'{"type": "result", "is_error": false}\n') == {"type": "result", "is_error": False}
    assert parse_line(b"Error: something went wrong\n") == {
        "type": "_text", "text": "Error: something went wrong"}
    # valid JSON that is not an object is still plain text to us
    assert parse_line("42") == {"type": "_text", "text": "42"}
    # a line cut in half by a concurrent write
    assert parse_line('{"type":"assistant","message":{"content":[')["type"] == "_text"
    # undecodable bytes do not raise
    assert parse_line(b"\xff\xfe oops")["type"] == "_text"


def test_plain_text_line_becomes_agent_text_and_counts():
    state = StreamState(clock=lambda: NOW)
    events = state.feed_raw(b"Warning: something odd\n")
    assert events == [Event("agent_text", {"text": "Warning: something odd"})]
    assert state.lines == 1
    assert state.last_activity == "text: Warning: something odd"


def test_unknown_type_is_other_with_its_name():
    assert events_for({"type": "session_state_changed"}) == [
        Event("other", {"type": "session_state_changed"})]


def test_assistant_message_with_several_blocks_yields_one_event_each():
    msg = assistant([
        {"type": "thinking", "thinking": "x" * 5000, "signature": "SIG" * 500},
        {"type": "text", "text": "Running the tests."},
        {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "pytest -q", "description": "d"}},
        {"type": "tool_use", "id": "t2", "name": "Grep", "input": {"pattern": "y" * 5000}},
        {"type": "tool_use", "id": "t3", "name": "NotebookEdit", "input": {"notebook_path": "/workspace/a.ipynb"}},
        {"type": "tool_use", "id": "t4", "name": "Edit",
         "input": {"file_path": "/workspace/a.py", "old_string": "a", "new_string": "b"}},
    ])
    events = events_for(msg)
    assert [e.kind for e in events] == ["thinking", "turn", "tool_call", "tool_call", "tool_call", "tool_call"]

    thinking = events[0].data
    assert "SIG" not in json.dumps(thinking)  # never the signature
    assert len(thinking["text"]) < 300  # and only a glimpse of the thinking

    assert events[1].data["text"] == "Running the tests."
    assert events[1].data["usage"] == {"input_tokens": 10, "output_tokens": 1}
    assert events[2].data == {"model": "claude-opus-5-5", "message_id": "msg_1",
                              "name": "Bash", "id": "t1", "command": "pytest -q"}
    assert len(events[3].data["input"]) < 2100 and "more chars" in events[3].data["input"]
    assert events[4].data["file_path"] == "/workspace/a.ipynb"
    assert events[5].data["file_path"] == "/workspace/a.py"
    assert "old_string" not in events[5].data


def test_tool_result_blocks_and_truncation():
    msg = {
        "type": "user",
        "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "is_error": True,
             "content": [{"type": "text", "text": "E" * 3000}, {"type": "image", "source": {"data": "B64"}}]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "ok"},
        ]},
    }
    first, second = events_for(msg)
    assert first.kind == "tool_result" and first.data["is_error"] is True
    assert first.data["tool_use_id"] == "t1"
    assert len(first.data["content"]) < 2100
    assert second.data == {"tool_use_id": "t2", "is_error": False, "content": "ok"}


def test_rate_limit_event_fields():
    (event,) = events_for({
        "type": "rate_limit_event",
        "rate_limit_info": {"status": "allowed_warning", "resetsAt": 1767225600,
                            "rateLimitType": "five_hour", "utilization": 0.8, "isUsingOverage": False},
    })
    assert event.kind == "rate_limit"
    assert event.data["status"] == "allowed_warning"
    assert event.data["resets_at"] == 1767225600
    assert event.data["rate_limit_type"] == "five_hour"
    assert event.data["utilization"] == 0.8


def test_result_text_is_truncated():
    (event,) = events_for(result("r" * 10_000))
    assert 4000 <= len(event.data["result"]) < 4100


def test_last_activity_follows_the_stream():
    state = StreamState(clock=lambda: NOW)
    state.feed(init())
    assert state.last_activity == "init claude-opus-5-5"
    state.feed(assistant([{"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "pytest -q"}}]))
    assert state.last_activity == "tool_call Bash: pytest -q"
    state.feed({"type": "system", "subtype": "status", "status": "requesting"})
    assert state.last_activity == "tool_call Bash: pytest -q"  # "other" does not hide it
    state.feed(api_retry(429, "rate_limit"))
    assert state.last_activity.startswith("api_retry 429")
    state.feed(assistant([{"type": "text", "text": "Done.\nMore detail."}]))
    assert state.last_activity == "turn: Done."
    assert state.final_text == "Done.\nMore detail."


def test_models_seen_is_ordered_and_deduplicated():
    state = run_lines([
        init("claude-opus-5-5"),
        assistant([{"type": "text", "text": "a"}], model="claude-haiku-5-5"),
        assistant([{"type": "text", "text": "b"}], model="claude-opus-5-5"),
        assistant([{"type": "text", "text": "c"}], model="claude-haiku-5-5"),
        api_error_line("API Error: boom", "unknown", 500, "api_error"),
    ])
    assert state.models_seen == ["claude-opus-5-5", "claude-haiku-5-5"]


# -- classification of synthetic endings ---------------------------------------------------------


def test_no_result_line_is_agent_error_with_exit_code():
    state = run_lines([init(), assistant([{"type": "text", "text": "working"}])])
    outcome = classify(state, 137)
    assert outcome.kind == "agent_error"
    assert "without a result" in outcome.message and "137" in outcome.message
    assert isinstance(outcome.to_error(), AgentFailed)


def test_retries_then_death_without_result_is_still_agent_error():
    state = run_lines([init(), api_retry(429, "rate_limit")])
    assert classify(state, None).kind == "agent_error"


def test_auth_error_stream():
    text = "Invalid API key · Please run /login"
    state = run_lines([
        init(),
        api_error_line(text, "authentication_failed", 401, "authentication_error"),
        error_result(text, 401, "authentication_error"),
    ])
    outcome = classify(state, 1)
    assert outcome.kind == "auth_error"
    assert outcome.message == text
    assert not outcome.to_error().retryable
    assert state.models_seen == ["claude-opus-5-5"]


def test_overloaded_529_stream():
    text = "API Error: Repeated 529 Overloaded errors"
    state = run_lines([
        init(),
        api_retry(529, "server_error", attempt=1, delay_ms=2000),
        api_retry(529, "server_error", attempt=2, delay_ms=4500),
        api_error_line(text, "server_error", 529, "overloaded_error"),
        error_result(text, 529, "overloaded_error"),
    ])
    outcome = classify(state, 1)
    assert outcome.kind == "overloaded"
    assert outcome.retry_after == pytest.approx(4.5)
    assert outcome.message == text
    assert isinstance(outcome.to_error(), Overloaded)


def test_spend_cap_429_is_not_retryable():
    text = ("API Error: 429 You have reached your specified API usage limits. "
            "You will regain access on 2026-12-01 at 00:00 UTC.")
    state = run_lines([
        init(),
        api_error_line(text, "rate_limit", 429, "rate_limit_error"),
        error_result(text, 429, "rate_limit_error"),
    ])
    outcome = classify(state, 1)
    assert outcome.kind == "api_error"
    assert not outcome.to_error().retryable
    assert "specified API usage limits" in outcome.message


def test_billing_error_is_api_error():
    text = "Credit balance is too low"
    state = run_lines([init(), api_error_line(text, "billing_error", 400, "invalid_request_error"),
                       error_result(text, 400, "invalid_request_error")])
    assert classify(state, 1).kind == "api_error"


def test_other_api_error_is_api_error():
    text = "API Error: 500 Internal server error"
    state = run_lines([init(), api_error_line(text, "server_error", 500, "api_error"),
                       error_result(text, 500, "api_error")])
    outcome = classify(state, 1)
    assert outcome.kind == "api_error" and outcome.message == text


def test_retries_that_recovered_are_success():
    state = run_lines([init(), api_retry(429, "rate_limit"), api_retry(529, "server_error", attempt=2),
                       assistant([{"type": "text", "text": "Done."}]), result()])
    assert classify(state, 0).kind == "success"


def test_success_result_with_non_zero_exit_is_agent_error():
    state = run_lines([init(), result()])
    outcome = classify(state, 1)
    assert outcome.kind == "agent_error" and "1" in outcome.message


def test_error_result_that_is_not_an_api_error_is_agent_error():
    state = run_lines([init(), result("", is_error=True, subtype="error_max_turns",
                                      terminal_reason="max_turns")])
    outcome = classify(state, 1)
    assert outcome.kind == "agent_error"
    assert "error_max_turns" in outcome.message


def test_rejected_rate_limit_event_gives_resets_at():
    resets = int(datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc).timestamp())
    state = run_lines([
        init(),
        {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": resets,
                                                         "rateLimitType": "five_hour"}},
        error_result("API Error: Request rejected (429)", 429, "rate_limit_error"),
    ])
    outcome = classify(state, 1, now=NOW)
    assert outcome.kind == "rate_limited"
    assert outcome.resets_at == datetime(2026, 11, 26, 14, 0, tzinfo=timezone.utc)
    assert outcome.retry_after == pytest.approx(4 * 3600)


def test_allowed_rate_limit_event_does_not_spoil_success():
    state = run_lines([init(), {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed_warning"}},
                       result()])
    assert classify(state, 0).kind == "success"
    assert state.rate_limit_events[0]["status"] == "allowed_warning"


def test_usage_limit_text_in_assistant_line_is_rate_limited_with_resets_at():
    text = "You've hit your limit · resets 1pm (Europe/Lisbon)"
    state = run_lines([
        init(),
        api_error_line(text, "rate_limit", 429, "rate_limit_error"),
        error_result(text, 429, "rate_limit_error"),
    ])
    outcome = classify(state, 1, now=NOW)
    assert outcome.kind == "rate_limited"
    assert outcome.resets_at == datetime(2026, 11, 26, 13, 0, tzinfo=ZoneInfo("Europe/Lisbon"))
    assert outcome.retry_after == pytest.approx(3 * 3600)  # Lisbon is UTC+0 in November


def test_usage_limit_text_in_a_success_result_still_counts():
    # older CLIs ended a usage-limited run with a non-error result carrying the message
    state = run_lines([init(), result("Claude AI usage limit reached|1767225600")])
    outcome = classify(state, 0, now=datetime(2025, 12, 31, 23, 0, tzinfo=timezone.utc))
    assert outcome.kind == "rate_limited"
    assert outcome.resets_at == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert outcome.retry_after == pytest.approx(3600)


# -- usage-limit wordings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Claude AI usage limit reached|1767225600", datetime(2026, 1, 1, tzinfo=timezone.utc)),
        ("You've hit your limit · resets 1pm (Europe/Lisbon)",
         datetime(2026, 11, 26, 13, 0, tzinfo=ZoneInfo("Europe/Lisbon"))),
        # 4:20 Warsaw (UTC+1) already passed today at 11:00 local: tomorrow
        ("You've hit your session limit · resets 4:20am (Europe/Warsaw)",
         datetime(2026, 11, 27, 4, 20, tzinfo=ZoneInfo("Europe/Warsaw"))),
        ("You've hit your weekly limit · resets Mon 9am (America/New_York)",
         datetime(2026, 11, 30, 9, 0, tzinfo=ZoneInfo("America/New_York"))),
        ("You've hit your weekly limit · resets Nov 28, 5pm (UTC)",
         datetime(2026, 11, 28, 17, 0, tzinfo=timezone.utc)),
        ("You've hit your Opus limit · resets 3:30pm (Europe/Lisbon)",
         datetime(2026, 11, 26, 15, 30, tzinfo=ZoneInfo("Europe/Lisbon"))),
        ("You\u2019ve hit your Opus weekly limit · resets Dec 1, 8am (Europe/Lisbon)",
         datetime(2026, 12, 1, 8, 0, tzinfo=ZoneInfo("Europe/Lisbon"))),
        # same weekday, hour already past: next week
        ("You've hit your weekly limit · resets Thu 9am (UTC)",
         datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)),
        ("You've hit your weekly limit · resets Thursday 11am (UTC)",
         datetime(2026, 11, 26, 11, 0, tzinfo=timezone.utc)),
        ("You're out of extra usage · resets 4pm (UTC)", datetime(2026, 11, 26, 16, 0, tzinfo=timezone.utc)),
        ("5-hour limit reached ∙ resets 3pm (UTC)", datetime(2026, 11, 26, 15, 0, tzinfo=timezone.utc)),
        ("API Error: You've hit your limit · resets 2pm (Asia/Shanghai)",
         datetime(2026, 11, 27, 14, 0, tzinfo=ZoneInfo("Asia/Shanghai"))),
    ],
)
def test_parse_usage_limit_wordings(text, expected):
    got = parse_usage_limit(text, NOW)
    assert got == expected
    assert got.tzinfo is not None
    assert got > NOW or "1767225600" in text


def test_parse_usage_limit_without_a_zone_uses_nows_zone():
    assert parse_usage_limit("You've hit your limit · resets 9pm", NOW) == datetime(
        2026, 11, 26, 21, 0, tzinfo=timezone.utc)


def test_parse_usage_limit_with_a_naive_now_takes_it_as_utc():
    naive = NOW.replace(tzinfo=None)
    assert parse_usage_limit("You've hit your limit · resets 1pm (UTC)", naive) == datetime(
        2026, 11, 26, 13, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Done.",
        "API Error: Request rejected (429) · Number of request tokens has exceeded your per-minute rate limit",
        "I added a rate limit that resets every 5 minutes.",
    ],
)
def test_parse_usage_limit_rejects_other_text(text):
    assert parse_usage_limit(text, NOW) is None
    assert not looks_like_usage_limit(text)


def test_unreadable_reset_time_is_still_a_usage_limit():
    text = "You've hit your limit · resets soon (Mars/Olympus)"
    assert parse_usage_limit(text, NOW) is None
    assert looks_like_usage_limit(text)
    state = run_lines([init(), api_error_line(text, "rate_limit", 429, "rate_limit_error"),
                       error_result(text, 429, "rate_limit_error")])
    outcome = classify(state, 1)
    assert outcome.kind == "rate_limited" and outcome.resets_at is None


def test_outcome_is_frozen():
    outcome = Outcome("success", "ok")
    with pytest.raises(AttributeError):
        outcome.kind = "agent_error"  # type: ignore[misc]
