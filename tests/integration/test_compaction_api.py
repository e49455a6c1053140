"""The session brief's small model over HTTP: the real Anthropic SDK against the scripted API on loopback (the
brief turns structural, naming why, when that model keeps answering 429 or another model answers)."""

from __future__ import annotations

import pytest

from executor.session import brief as session_brief
from executor.session.summarizer import Summarizer
from tests.scripted_api import ScriptedAPI, Turn
from tests.unit.test_compaction import _next, make_recorded


@pytest.fixture
def recorded(tmp_path):
    return make_recorded(tmp_path)


def test_structural_brief_when_the_small_model_keeps_answering_429(recorded):
    store, skills_dir = recorded
    job = _next(store)
    limit = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit")
    with ScriptedAPI(default=limit, side_filter=lambda body: False) as api:
        sleeps: list[float] = []
        model = Summarizer("claude-haiku-4-5", "sk-fake", api.base_url, attempts=3, backoff=0.5, sleep=sleeps.append)
        brief = session_brief.build(store, "s1", job, skills_dir, model)
        calls = [r for r in api.requests if r.is_messages]
    assert brief.mode == "structural"
    assert "429" in brief.reason and "after 3 attempts" in brief.reason
    assert {r.body["model"] for r in calls} == {"claude-haiku-4-5"}  # the same model, never another
    assert len(calls) == 4 * 3  # four items to summarize, three attempts each
    assert sleeps and max(sleeps) <= 2.0
    text = brief.text
    assert "structural, without model summaries" in text
    assert "- app/utils.py (read by j1)" in text
    assert "- j1 [succeeded]: requested: Add parse_date to app/dates.py; changed app/dates.py; tests: pass" in text
    assert "rolled_back: tests_failed the tests failed (exit 1)" in text
    assert session_brief.retention_problems(text, brief.history) == []
    assert all(r.model is None for r in brief.rows)


def test_a_different_model_answering_makes_the_brief_structural(recorded):
    store, skills_dir = recorded
    with ScriptedAPI(default=Turn.text("- a file", model="claude-sonnet-4-5"), side_filter=lambda b: False) as api:
        model = Summarizer("claude-haiku-4-5", "sk-fake", api.base_url, attempts=2)
        brief = session_brief.build(store, "s1", _next(store), skills_dir, model)
    assert brief.mode == "structural" and "claude-sonnet-4-5" in brief.reason and "no fallback" in brief.reason


def test_the_real_sdk_path_writes_summaries(recorded):
    store, skills_dir = recorded
    with ScriptedAPI(default=Turn.text("- the utilities module\n- slugify is used by dates"),
                     side_filter=lambda b: False) as api:
        model = Summarizer("claude-haiku-4-5", "sk-fake", api.base_url)
        brief = session_brief.build(store, "s1", _next(store), skills_dir, model)
    assert brief.mode == "model"
    assert "  - slugify is used by dates" in brief.text
    assert all(r.latency is not None and r.model == "claude-haiku-4-5" for r in brief.rows if r.kind != "skill")
