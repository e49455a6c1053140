"""The session brief builder on recorded event logs: files read but not changed are summarized, settled
jobs condensed, skills swapped in and out, the last message kept; the structural brief when the small
model cannot be had; every summary a row beside the event ids it replaced. The small model over HTTP (a scripted API server) is
tests/integration/test_compaction_api.py's."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from executor.clock import utcnow
from executor.errors import CompactionUnavailable, InvalidJob
from executor.intake.jobs import parse_spec, validate
from executor.policy import Policy, Runner
from executor.session import brief as session_brief
from executor.session import compaction
from executor.session import history as session_history
from executor.session.summarizer import Answer
from executor.settings import Settings
from executor.store import Job, Status, Store

UTILS_CONTENT = "     1\tdef slugify(text):\n     2\t    return UNIQUE_BODY_MARKER_42\n"
FINAL = "Added parse_date in app/dates.py.\nOpen items:\n- handle time zones\n- TODO: document the format"


class FakeModel:
    """A small model that answers at once (the summary names the item it was asked about)."""

    model = "claude-haiku-4-5"
    attempts = 1

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> Answer:
        self.prompts.append(prompt)
        first = prompt.splitlines()[0]
        return Answer(f"- summary of: {first[:60]}\n- key point", self.model, len(prompt) // 4, 12, 0.01)


def _job(store: Store, job_id: str, n: int, status: Status, **fields) -> Job:
    job = Job(id=job_id, session_id="s1", runner="r", model_requested="claude-sonnet-4-5", workspace="/w",
              prompt=fields.pop("prompt", f"task {job_id}"), policy_name="default", status=status,
              created_at=utcnow() - timedelta(minutes=10 - n), **fields)
    store.add_job(job)
    return job


def _tool(store, job, tool_id, name, result, **data):
    store.add_event(job, 1, "tool_call", {"name": name, "id": tool_id, **data})
    store.add_event(job, 1, "tool_result", {"tool_use_id": tool_id, "is_error": False, "content": result})


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Store, Path]:
    return make_recorded(tmp_path)


def make_recorded(tmp_path: Path) -> tuple[Store, Path]:
    """Two settled jobs: one committed (read two files, changed one), one rolled back."""
    store = Store(tmp_path / "db" / "executor.db")
    skills = tmp_path / "policies" / "skills"
    skills.mkdir(parents=True)
    (skills / "style.md").write_text("---\ndescription: House code style for this repo\n---\nUse 4 spaces. STYLE-BODY\n")
    (skills / "release.md").write_text("# How to cut a release\nBump the version. RELEASE-BODY\n")
    one = _job(store, "j1", 1, Status.succeeded, prompt="Add parse_date to app/dates.py", skills=["style"],
               changed_files=["app/dates.py"], test_command="python3 -m pytest -q", final_text="Done: parse_date.")
    _tool(store, one, "t1", "Read", UTILS_CONTENT, file_path="/workspace/app/utils.py")
    _tool(store, one, "t2", "Read", "     1\tdef old():\n", file_path="/workspace/app/dates.py")
    _tool(store, one, "t3", "Edit", "ok", file_path="/workspace/app/dates.py")
    _tool(store, one, "t4", "Bash", "3 passed in 0.01s", command="python3 -m pytest -q")
    store.add_event(one, 1, "tests", {"command": "python3 -m pytest -q", "exit_code": 0, "output_tail": "3 passed in 0.02s"})
    two = _job(store, "j2", 2, Status.rolled_back, prompt="Make parse_date accept ISO weeks", reason="tests_failed",
               error="the tests failed (exit 1): python3 -m pytest -q", final_text=FINAL)
    _tool(store, two, "t5", "Read", "     1\t[tool]\n", file_path="/workspace/pyproject.toml")
    _tool(store, two, "t6", "Edit", "ok", file_path="/workspace/app/dates.py")
    store.add_event(two, 1, "tests", {"command": "python3 -m pytest -q", "exit_code": 1, "output_tail": "1 failed, 3 passed"})
    return store, skills


def _next(store: Store, skills: list[str] | None = None) -> Job:
    return _job(store, "j3", 3, Status.queued, prompt="Next step", skills=skills)


def test_brief_summarizes_read_files_condenses_jobs_and_keeps_the_last_message(recorded):
    store, skills_dir = recorded
    model = FakeModel()
    job = _next(store)
    brief = session_brief.build(store, "s1", job, skills_dir, model)
    text = brief.text
    assert brief.mode == "model" and brief.reason is None
    # files read but not changed: key points, never the content
    assert "app/utils.py" in text and "pyproject.toml" in text
    assert "UNIQUE_BODY_MARKER_42" not in text
    assert "summary of: A file the session read but did not change: app/utils.py" in text
    # changed files by path, with the job that changed them
    assert "- app/dates.py: changed by j1 (committed), j2 (rolled back)" in text
    # settled jobs condensed to one line each (model-written here)
    assert "- j1 [succeeded]: - summary of: An earlier job of the session:" in text
    assert "- j2 [rolled_back]:" in text
    # the test command and its last outcome
    assert "`python3 -m pytest -q`" in text and "last outcome (job j2): fail (exit 1): 1 failed, 3 passed" in text
    # the last job's final message and open items, verbatim
    assert FINAL in text
    assert "- - handle time zones" in text and "- - TODO: document the format" in text
    assert session_brief.retention_problems(text, brief.history) == []
    # the skill of the session that this job does not name: its one-liner
    assert "- style: House code style for this repo" in text and "STYLE-BODY" not in text


def test_every_summary_is_a_row_beside_the_events_it_replaced(recorded):
    store, skills_dir = recorded
    job = _next(store)
    brief = session_brief.build(store, "s1", job, skills_dir, FakeModel())
    store.add_compactions(brief.rows)
    rows = store.compactions(job_id="j3")
    kinds = sorted((r.kind, r.subject) for r in rows)
    assert kinds == [("file", "app/utils.py"), ("file", "pyproject.toml"), ("settled_job", "j1"),
                     ("settled_job", "j2"), ("skill", "style")]
    utils = next(r for r in rows if r.subject == "app/utils.py")
    read_events = [e.id for e in store.events(job_id="j1") if e.data.get("file_path") == "/workspace/app/utils.py"
                   or e.data.get("tool_use_id") == "t1"]
    assert utils.event_ids == read_events
    assert utils.model == "claude-haiku-4-5" and utils.input_tokens and utils.output_tokens == 12
    assert utils.cost_usd == pytest.approx((utils.input_tokens * 1 + 12 * 5) / 1e6)
    assert utils.source_size == len(UTILS_CONTENT) and utils.summary_size == len(utils.summary.encode())
    j1 = next(r for r in rows if r.subject == "j1")
    assert j1.event_ids == [e.id for e in store.events(job_id="j1")]
    skill = next(r for r in rows if r.kind == "skill")
    assert skill.model is None and skill.summary == "House code style for this repo"


def test_summaries_are_reused_not_paid_twice(recorded):
    store, skills_dir = recorded
    job = _next(store)
    first = session_brief.build(store, "s1", job, skills_dir, FakeModel())
    store.add_compactions(first.rows)
    again = FakeModel()
    second = session_brief.build(store, "s1", job, skills_dir, again)
    assert again.prompts == []
    assert second.text == first.text
    assert all(r.cost_usd == 0.0 and r.reused_from for r in second.rows if r.model)


def test_skills_swap_in_and_out(recorded):
    store, skills_dir = recorded
    job = _next(store, skills=["release"])
    text = session_brief.build(store, "s1", job, skills_dir, FakeModel()).text
    assert "### Skill release (in full)" in text and "RELEASE-BODY" in text
    assert "- style: House code style for this repo" in text and "STYLE-BODY" not in text
    store.update_job("j3", skills=["style"])
    text = session_brief.build(store, "s1", store.get("j3"), skills_dir, FakeModel()).text
    assert "STYLE-BODY" in text and "RELEASE-BODY" not in text


#: The job's runner: compaction goes through its endpoint with its credential (here: not set).
RUNNER = Runner(name="r", model="claude-sonnet-4-5", auth_env="NO_SUCH_KEY_VAR")


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(home=tmp_path / "home", policies=tmp_path / "policies", **kw)


def test_start_records_structural_with_the_reason_or_fails_when_required(recorded, tmp_path):
    store, _ = recorded
    job = _next(store)
    settings = _settings(tmp_path)
    begun = compaction.start(store, settings, {}, job, Policy(), 1, RUNNER, transcript_ok=lambda sid: False)
    assert begun.resume is None and "structural" in begun.brief
    record = store.get("j3").compaction
    assert record.startswith("structural: the small model's credential is missing: runner 'r''s NO_SUCH_KEY_VAR")
    event = [e for e in store.events(job_id="j3") if e.kind == "compaction"][-1]
    assert event.data["mode"] == "structural" and event.data["brief"] == begun.brief
    # a rate-limit resume of the same job goes on with its conversation (which holds the brief); a fresh
    # attempt (the executor stopped) gets the same brief again, without calling the model again
    again = compaction.start(store, settings, {}, job, Policy(), 2, RUNNER, transcript_ok=lambda sid: False,
                             resuming=True)
    assert again.brief is None and again.resume is None
    again = compaction.start(store, settings, {}, job, Policy(), 2, RUNNER, transcript_ok=lambda sid: False)
    assert again.brief == begun.brief
    other = _job(store, "j4", 4, Status.queued)
    with pytest.raises(CompactionUnavailable):
        compaction.start(store, settings, {}, other, Policy(compaction_required=True), 1, RUNNER,
                         transcript_ok=lambda s: False)
    assert store.get("j4").compaction.startswith("failed: ")


def test_start_resume_mode_continues_the_previous_conversation(recorded, tmp_path):
    store, _ = recorded
    attempt = store.start_attempt("j2", 1)
    store.finish_attempt(attempt.id, claude_session_id="claude-abc")
    job = _next(store)
    begun = compaction.start(store, _settings(tmp_path), {}, job, Policy(context="resume"), 1, RUNNER,
                             transcript_ok=lambda sid: sid == "claude-abc")
    assert begun.resume == "claude-abc" and begun.brief is None
    assert store.get("j3").compaction == "resume"
    # the skills a resumed job names still ride along in full (nothing else: the conversation goes on)
    skilled = _job(store, "j6", 6, Status.queued, skills=["release"])
    begun = compaction.start(store, _settings(tmp_path), {}, skilled, Policy(context="resume"), 1, RUNNER,
                             transcript_ok=lambda sid: sid == "claude-abc")
    assert begun.resume == "claude-abc" and begun.brief is None
    assert "RELEASE-BODY" in begun.prompt_note and "app/utils.py" not in begun.prompt_note
    assert "- style: House code style for this repo" in begun.prompt_note
    # context "full" bypasses compaction: the raw history rides along, no model involved
    full = _job(store, "j5", 5, Status.queued, context="full")
    begun = compaction.start(store, _settings(tmp_path), {}, full, Policy(context="resume"), 1, RUNNER,
                             transcript_ok=lambda sid: True)
    assert begun.resume is None and "UNIQUE_BODY_MARKER_42" in begun.brief
    assert store.compactions(job_id="j5") == []


def test_first_job_of_a_session_gets_no_brief(tmp_path):
    store = Store(tmp_path / "executor.db")
    job = _job(store, "solo", 1, Status.queued)
    begun = compaction.start(store, _settings(tmp_path), {}, job, Policy(), 1, RUNNER, transcript_ok=lambda s: False)
    assert begun.brief is None and begun.resume is None and store.get("solo").compaction is None


def test_open_items_are_found_verbatim():
    text = "All done.\nStill need to wire the CLI.\nNext steps:\n- add docs\n* bump version\n\nUnrelated - bullet"
    assert session_history.open_items(text) == ["Still need to wire the CLI.", "Next steps:", "- add docs", "* bump version"]
    assert session_history.open_items("Done.") == []


def test_job_files_name_skills_that_exist_and_context_full(tmp_path):
    policies = tmp_path / "policies"
    (policies / "skills").mkdir(parents=True)
    (policies / "default.toml").write_text("")
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "X"\n')
    (policies / "skills" / "style.md").write_text("style\n")
    repo = tmp_path / "repos" / "r"
    repo.mkdir(parents=True)
    import os
    os.chown(repo, 1000, 1000)
    settings = Settings(home=tmp_path / "home", policies=policies, workspace_roots=[tmp_path / "repos"])
    base = {"runner": "r", "workspace": str(repo), "prompt": "p"}
    valid = validate(parse_spec({**base, "skills": ["style"], "context": "full"}), settings)
    assert valid.spec.skills == ["style"] and valid.spec.context == "full"
    with pytest.raises(InvalidJob, match="unknown skill 'nope'"):
        validate(parse_spec({**base, "skills": ["nope"]}), settings)
    with pytest.raises(InvalidJob):
        parse_spec({**base, "context": "resume"})
    with pytest.raises(Exception):
        Policy(context="sometimes")


def test_session_context_and_full_print_the_brief_and_the_history(recorded, tmp_path):
    from click.testing import CliRunner

    from executor.surfaces.cli import main

    store, _ = recorded
    _next(store)
    env = {"EXECUTOR_HOME": str(tmp_path / "db"), "EXECUTOR_POLICIES": str(tmp_path / "policies")}
    out = CliRunner().invoke(main, ["session", "s1", "--context"], env=env)
    assert out.exit_code == 0, out.output
    assert "# Session brief: session s1, 2 earlier job(s)" in out.output
    assert "- app/utils.py (read by j1)" in out.output and "UNIQUE_BODY_MARKER_42" not in out.output
    assert "structural (no summary yet" in out.output
    brief = session_brief.build(store, "s1", store.get("j3"), tmp_path / "policies" / "skills", FakeModel())
    store.add_compactions(brief.rows)
    out = CliRunner().invoke(main, ["session", "s1", "--context", "--skill", "release"], env=env)
    assert out.exit_code == 0, out.output
    assert "summary of: A file the session read but did not change: app/utils.py" in out.output
    assert "claude-haiku-4-5 (row" in out.output and "RELEASE-BODY" in out.output
    out = CliRunner().invoke(main, ["session", "s1", "--full"], env=env)
    assert out.exit_code == 0 and "UNIQUE_BODY_MARKER_42" in out.output and "-- raw history:" in out.output
