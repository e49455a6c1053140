"""Retry decisions (tenacity strategies) and the classifier on transcripts captured with the scripted API."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from executor.agent.claude_code.events import parse_line
from executor.agent.claude_code.outcome import classify
from executor.agent.claude_code.stream import StreamState
from executor.errors import AgentFailed, ModelMismatch, Overloaded, RateLimited
from executor.job.retry import decide
from executor.policy import Policy

CAPTURED = Path(__file__).resolve().parents[1] / "fixtures"
NOW = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)


def replay(name: str, exit_code: int | None) -> tuple[StreamState, str]:
    state = StreamState()
    for raw in (CAPTURED / name).read_bytes().splitlines():
        state.feed(parse_line(raw))
    return state, classify(state, exit_code, now=NOW).kind


@pytest.mark.parametrize("name, exit_code, kind", [
    ("rate-limit-429-retry1.jsonl", 1, "rate_limited"),
    ("overloaded-529.jsonl", 1, "overloaded"),
    ("auth-401.jsonl", 1, "auth_error"),
    ("auth-401-no-retry.jsonl", 1, "auth_error"),
    ("bash-edit.jsonl", 0, "success"),
    ("slow-text.jsonl", 0, "success"),
    ("hang.jsonl", -9, "agent_error"),
])
def test_captured_transcripts_classify(name, exit_code, kind):
    state, got = replay(name, exit_code)
    assert got == kind
    assert "<synthetic>" not in state.models_seen


def test_rate_limited_transcript_carries_the_cli_retry_delay():
    state, _ = replay("rate-limit-429-retry1.jsonl", 1)
    outcome = classify(state, 1, now=NOW)
    assert outcome.retry_after is not None and 0 < outcome.retry_after <= 5
    assert outcome.to_error().retryable


def test_exponential_backoff_follows_the_policy():
    policy = Policy(backoff_initial="10s", backoff_multiplier=3, backoff_max="60s", max_attempts=5)
    delays = [decide(policy, RateLimited("429"), n, NOW).delay for n in (1, 2, 3)]
    assert delays == [10.0, 30.0, 60.0]  # 10, 10x3, then capped at backoff_max
    assert decide(policy, RateLimited("429"), 5, NOW).retry is False


def test_a_longer_retry_after_wins_over_the_backoff():
    decision = decide(Policy(), RateLimited("429"), 1, NOW, retry_after=120.0)
    assert decision.retry and decision.delay == 120.0 and decision.counts


def test_usage_limit_waits_for_its_reset_without_using_an_attempt():
    resets = NOW + timedelta(hours=2)
    decision = decide(Policy(max_attempts=2), RateLimited("usage limit"), 2, NOW, resets_at=resets)
    assert decision.retry and decision.delay == 7200.0 and not decision.counts


@pytest.mark.parametrize("error", [AgentFailed("boom"), ModelMismatch("r", "a", ["b"])])
def test_errors_that_waiting_cannot_cure_are_not_retried(error):
    assert decide(Policy(), error, 1, NOW).retry is False


def test_overloaded_is_retried_like_a_rate_limit():
    assert decide(Policy(), Overloaded("529"), 1, NOW).retry is True
