"""Jobs made from jobs: a retry and a reviewer's revision go through intake's own checks, and the diff a
person decided on is kept (and clipped when it is huge)."""

from __future__ import annotations

import os
import shutil

import pytest

from executor.errors import InvalidJob
from executor.intake import followup
from executor.intake.jobs import parse_spec, validate
from executor.intake.spool import job_from
from executor.review import FileDiff, kept
from executor.store import Status


def ended(world, status: Status, **fields):
    repo = world.repos / "app"
    if not repo.exists():
        repo = world.repo("app", {"a.py": "x = 1\n"})
    job = job_from(validate(parse_spec({"runner": "scripted", "workspace": str(repo), "prompt": "do it",
                                        "session_id": "sess", "priority": 3}), world.settings()), None)
    job.status = status
    for name, value in fields.items():
        setattr(job, name, value)
    return job


@pytest.mark.parametrize("status", [Status.failed, Status.rolled_back, Status.stalled, Status.cancelled])
def test_a_retry_is_the_same_task_in_the_same_session(world, status):
    job = ended(world, status)
    made = followup.retry(job, world.settings())
    assert made.id != job.id and made.follows == job.id and made.builds_on is None
    assert (made.prompt, made.session_id, made.priority, made.runner, made.workspace) == \
        ("do it", "sess", 3, "scripted", job.workspace)
    assert made.status == Status.queued and made.start_ns is None


@pytest.mark.parametrize("status", [Status.queued, Status.running, Status.succeeded, Status.awaiting_review,
                                    Status.rejected])
def test_only_an_unsuccessful_ended_job_is_retried(world, status):
    with pytest.raises(InvalidJob, match="only a failed, rolled back, stalled or cancelled job"):
        followup.retry(ended(world, status), world.settings())


def test_a_retry_is_judged_as_a_job_file_would_be_now(world):
    job = ended(world, Status.failed)
    world.write_runners(world.base_url, models={"other": "claude-sonnet-4-5"})  # its runner is gone
    with pytest.raises(InvalidJob, match=f"a job made from {job.id} would be refused: unknown runner 'scripted'"):
        followup.retry(job, world.settings())


def test_a_revision_of_a_revision_is_not_retried(world):
    with pytest.raises(InvalidJob, match="retry job base's task instead"):
        followup.retry(ended(world, Status.rolled_back, builds_on="base"), world.settings())


def test_a_revision_takes_the_note_as_prompt_and_the_change_from_when_it_began(world):
    job = ended(world, Status.awaiting_review, start_ns=1234)
    made = followup.revision(job, "  make it 43  ", world.settings())
    assert made.prompt == "make it 43" and made.builds_on == job.id and made.follows == job.id
    assert made.start_ns == 1234 and made.session_id == "sess"
    with pytest.raises(InvalidJob, match="say what should change"):
        followup.revision(job, " \n", world.settings())


def test_a_revision_refuses_a_workspace_that_is_another_directory_now(world):
    job = ended(world, Status.awaiting_review)
    moved = world.repos / "app-old"
    os.rename(job.workspace, moved)
    shutil.copytree(moved, job.workspace)  # same path, another directory
    os.chown(job.workspace, 1000, 1000)
    with pytest.raises(InvalidJob, match="no longer the directory job .* changed"):
        followup.revision(job, "again", world.settings())


def test_a_kept_diff_reads_back_as_the_reviewer_saw_it_and_a_huge_one_is_clipped(world, monkeypatch):
    settings = world.settings()
    small = FileDiff("a.py", "modified", "modified", old="x = 1\n", new="x = 2\n", added=1, removed=1)
    gone = FileDiff("lib", "dir_deleted", "directory deleted", removed_paths=[f"lib/{i}.py" for i in range(250)])
    kept.keep(settings, "j1", [small, gone])
    files = kept.load(settings, "j1")
    assert [f["path"] for f in files] == ["a.py", "lib"]
    assert files[0]["hunks"][0]["lines"] == [["-", 1, None, "x = 1"], ["+", None, 1, "x = 2"]]
    assert len(files[1]["removed_paths"]) == 200 and files[1]["more_removed"] == 50
    text = kept.render(files)
    assert "-x = 1\n+x = 2\n" in text and "and 50 more removed" in text
    assert oct(os.stat(kept.path_of(settings, "j1")).st_mode & 0o777) == "0o600"

    monkeypatch.setattr(kept, "LIMIT", 10)
    kept.keep(settings, "j2", [small])
    [clipped] = kept.load(settings, "j2")
    assert clipped["hunks"] == [] and clipped["clipped"] and "were not kept" in kept.render([clipped])
    assert kept.load(settings, "nothing") is None


def test_a_kept_diff_on_the_page_is_escaped_and_says_what_a_partial_approval_left_out():
    from executor.surfaces.web.views import kept_view

    entry = {"path": "page.html", "kind": "modified", "note": "modified", "added": 1, "removed": 0,
             "hunks": [{"header": "@@ -0,0 +1,1 @@", "lines": [["+", None, 1, "<script>alert(1)</script>"]]}]}
    view = kept_view(entry, applied=["other.txt"])
    [row] = view["hunks"][0]["rows"]
    assert "<script>" not in row["html"] and "&lt;" in row["html"]
    assert "not applied (not chosen)" in view["note"]
    assert "not applied" not in kept_view(entry, applied=["page.html"])["note"]
