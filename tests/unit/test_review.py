"""Tests for executor.review (triggers, globs, the model's REVIEW line, the diff, approve/reject on hand-built
upper dirs); notifications and the page's access rules, which need a server, are in
tests/integration/test_review_servers.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from executor import review
from executor.clock import utcnow
from executor.errors import Conflict, ReviewError
from executor.policy import Policy
from executor.settings import Settings
from executor.store import Job, Status, Store
from executor.transaction.upper import Change, Entry, scan_upper
from tests.unit.upper_tree import opaque, require_root, require_user_xattrs, whiteout, write


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()

UID = GID = 1000




def change_of(*paths: str) -> Change:
    return Change(entries=[Entry(p, "file", 0o644, 1) for p in paths])


# ---------------------------------------------------------------------------------------------- globs


@pytest.mark.parametrize("path, pattern, hit", [
    ("tests/test_a.py", "tests/**", True),
    ("tests/unit/deep/test_b.py", "tests/**", True),
    ("tests", "tests/**", True),  # the whole directory deleted
    ("src/tests/test_c.py", "tests/**", False),  # a slash anchors at the root
    ("testsuite.py", "tests/**", False),
    ("migrations/0002_add.sql", "migrations/**", True),
    (".github/workflows/ci.yml", ".github/**", True),
    ("Dockerfile", "Dockerfile", True),
    ("services/api/Dockerfile", "Dockerfile", True),  # no slash: at any depth
    ("Dockerfile.dev", "Dockerfile", False),
    ("db/schema.sql", "*.sql", True),
    ("db/schema.sql.bak", "*.sql", False),
    ("a/x/y/c.py", "a/**/c.py", True),
    ("a/c.py", "a/**/c.py", True),
    ("b/c.py", "a/**/c.py", False),
    ("x1.txt", "x[0-9].txt", True),
    ("xa.txt", "x[0-9].txt", False),
    ("migrations/0001.sql", "migrations", True),  # a directory covers what is below it
    ("src/app.py", "src/*.py", True),
    ("src/sub/app.py", "src/*.py", False),
])
def test_glob_matching(path, pattern, hit):
    assert bool(review.matching(path, [pattern])) is hit


# ------------------------------------------------------------------------------------- the model's line


@pytest.mark.parametrize("text, reason", [
    ("I changed the auth check.\nREVIEW: touches the login path", "touches the login path"),
    ("Done.\n\n**REVIEW:** unsure whether the migration is reversible\n", "unsure whether the migration is reversible"),
    ("REVIEW: first\nmore text\nREVIEW: second", "second"),
    ("Done.\nREVIEW:", "the model asked for a review without saying why"),
    ("Done. No review needed.", None),
    ("The review: fine", None),
    ("", None),
    (None, None),
])
def test_model_review_line(text, reason):
    assert review.model_review_line(text) == reason


# ------------------------------------------------------------------------------------------- triggers


def test_triggers_each_give_their_reason():
    auto = Policy(review_paths=("migrations/**", "Dockerfile"), review_max_changed_lines=10)
    assert review.review_reasons(auto, change_of("src/app.py"), "Done.", 3) == []
    [r] = review.review_reasons(auto, change_of("src/app.py", "migrations/0002.sql"), "Done.", 3)
    assert r["trigger"] == "review_paths" and r["paths"] == ["migrations/0002.sql"]
    assert "migrations/**" in r["message"] and "migrations/0002.sql" in r["message"]
    [r] = review.review_reasons(auto, change_of("tests/test_app.py"), "Done.", 3)
    assert r["trigger"] == "protected_paths" and "tests/test_app.py" in r["message"]
    [r] = review.review_reasons(auto, change_of("src/app.py"), "Done.", 11)
    assert r["trigger"] == "changed_lines" and r["lines"] == 11 and "11 changed lines" in r["message"]
    [r] = review.review_reasons(auto, change_of("src/app.py"), "Done.\nREVIEW: not sure about the locking", 3)
    assert r["trigger"] == "model" and "not sure about the locking" in r["message"]
    always = Policy(review="always")
    [r] = review.review_reasons(always, change_of("src/app.py"), "Done.", 3)
    assert r["trigger"] == "always"
    # several at once, all listed
    reasons = review.review_reasons(auto, change_of("Dockerfile", "tests/t.py"), "REVIEW: x", 50)
    assert [r["trigger"] for r in reasons] == ["review_paths", "protected_paths", "changed_lines", "model"]


def test_never_commits_whatever_fires_and_an_empty_change_needs_nobody():
    never = Policy(review="never", review_paths=("**",), review_max_changed_lines=0)
    assert review.review_reasons(never, change_of("tests/t.py"), "REVIEW: please", 1000) == []
    assert review.review_reasons(Policy(review="always"), Change(), "REVIEW: please", 0) == []
    assert review.review_reasons(Policy(protected_paths=()), change_of("tests/t.py"), "", 0) == []


def test_policy_fields_and_the_system_prompt_instruction(tmp_path):
    from executor.job.pipeline import system_prompt_parts

    p = Policy()
    assert (p.review, p.review_paths, p.protected_paths, p.review_max_changed_lines) == ("auto", (), ("tests/**",), None)
    with pytest.raises(ValueError):
        Policy(review="sometimes")
    with pytest.raises(ValueError):
        Policy(review_path=["x"])  # extra=forbid
    assert review.REVIEW_INSTRUCTION in system_prompt_parts(Policy())
    assert review.REVIEW_INSTRUCTION in system_prompt_parts(Policy(review="always"))
    assert review.REVIEW_INSTRUCTION not in system_prompt_parts(Policy(review="never"))
    assert "REVIEW: <" in review.REVIEW_INSTRUCTION


# ----------------------------------------------------------------------------------------------- diff


@pytest.fixture
def tree(tmp_path: Path):
    require_user_xattrs(tmp_path)
    repo, upper = tmp_path / "repo", tmp_path / "upper"
    write(repo / "src/app.py", "def main():\n    return 1\n\n\nprint(main())\n")
    write(repo / "old.txt", "one\ntwo\n")
    write(repo / "gone/a.txt", "a1\na2\n")
    write(repo / "gone/sub/b.txt", "b\n")
    write(repo / "lib/keep.py", "k = 1\n")
    write(repo / "lib/drop.py", "d = 1\nd = 2\n")
    write(repo / "run.sh", "#!/bin/sh\necho hi\n", 0o644)
    write(repo / "img.png", b"\x89PNG\r\n\x1a\n\0\0old")
    upper.mkdir()
    write(upper / "src/app.py", "def main():\n    return 2\n\n\nprint(main())\n")
    write(upper / "new.md", "# new\nline\n")
    whiteout(upper / "old.txt")
    whiteout(upper / "gone")
    opaque(upper / "lib")
    write(upper / "lib/keep.py", "k = 2\n")
    write(upper / "run.sh", "#!/bin/sh\necho hi\n", 0o755)
    write(upper / "img.png", b"\x89PNG\r\n\x1a\n\0\0new!")
    os.symlink("src/app.py", upper / "link")
    return repo, upper


def diff_change(upper: Path, repo: Path) -> list:
    """``review.diff_change`` through read-only trees on pinned fds, as the review path calls it."""
    from executor.transaction.tree import Tree

    ufd, rfd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY), os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return review.diff_change(scan_upper(upper), Tree(ufd), Tree(rfd))
    finally:
        os.close(ufd)
        os.close(rfd)


def test_diff_states_every_kind_of_change(tree):
    repo, upper = tree
    diffs = {d.path: d for d in diff_change(upper, repo)}
    assert set(diffs) == {"src/app.py", "new.md", "old.txt", "gone", "lib", "lib/keep.py", "run.sh", "img.png", "link"}
    app = diffs["src/app.py"]
    assert app.kind == "modified" and (app.added, app.removed) == (1, 1)
    text = app.unified()
    assert "--- a/src/app.py\n+++ b/src/app.py\n" in text
    assert "-    return 1\n" in text and "+    return 2\n" in text
    assert diffs["new.md"].kind == "added" and "+++ b/new.md" in diffs["new.md"].unified()
    assert "--- /dev/null" in diffs["new.md"].unified()
    old = diffs["old.txt"]
    assert old.kind == "deleted" and old.note.startswith("deleted") and "-one\n-two\n" in old.unified()
    assert "+++ /dev/null" in old.unified()
    gone = diffs["gone"]
    assert gone.kind == "dir_deleted" and gone.removed_paths == ["gone/a.txt", "gone/sub/b.txt"] and gone.removed == 3
    lib = diffs["lib"]
    assert lib.kind == "dir_replaced" and lib.removed_paths == ["lib/drop.py"] and lib.removed == 2
    assert diffs["run.sh"].kind == "mode" and "644 -> 755" in diffs["run.sh"].note
    assert diffs["img.png"].kind == "binary" and "binary" in diffs["img.png"].note and diffs["img.png"].unified() == ""
    assert diffs["link"].kind == "symlink" and "-> src/app.py" in diffs["link"].note
    text = review.render_unified(list(diffs.values()))
    assert "=== gone: directory deleted with its 2 entries" in text and "removed: gone/sub/b.txt" in text
    assert "=== img.png: binary file changed" in text
    hunks = app.hunks()
    assert hunks and hunks[0]["header"].startswith("@@ -1,")
    assert ("-", 2, None, "    return 1") in hunks[0]["lines"] and ("+", None, 2, "    return 2") in hunks[0]["lines"]
    assert review.changed_lines(list(diffs.values())) == sum(d.added + d.removed for d in diffs.values())


def test_diff_marks_a_missing_final_newline(tmp_path):
    repo, upper = tmp_path / "r", tmp_path / "u"
    write(repo / "a.txt", "x\n")
    write(upper / "a.txt", "x")
    [d] = diff_change(upper, repo)
    assert "\\ No newline at end of file" in d.unified() and d.added + d.removed >= 1


# -------------------------------------------------------------------------------------------- select


def test_select_takes_the_chosen_paths_and_their_parents(tree):
    repo, upper = tree
    change = scan_upper(upper)
    part = review.select(change, ["lib/keep.py", "new.md"])
    kinds = {e.path: e.kind for e in part.entries}
    assert kinds == {"lib": "dir", "lib/keep.py": "file", "new.md": "file"}  # the replaced dir is not emptied
    assert review.select(change, ["lib"]).changed_files == ["lib", "lib/keep.py"]
    assert review.select(change, None) is change
    with pytest.raises(ReviewError, match="not changed by the job: nope.txt"):
        review.select(change, ["nope.txt"])


# ------------------------------------------------------------------------------- approve and reject


@pytest.fixture
def pending_job(tmp_path: Path):
    """A job in awaiting_review with a hand-built upper dir, as the pipeline leaves one."""
    settings = Settings(home=tmp_path / "home", policies=tmp_path / "policies", workspace_roots=[tmp_path])
    repo = tmp_path / "repo"
    write(repo / "a.txt", "a\n")
    write(repo / "b.txt", "b\n")
    write(repo / "c.txt", "c\n")
    time.sleep(0.05)  # the conflict check allows for a coarse clock (commit.CLOCK_SLACK_NS)
    start_ns = time.time_ns()
    store = Store(settings.db_path)
    store.add_job(Job(id="rj", session_id="rj", runner="r", model_requested="m", workspace=str(repo),
                            prompt="p", policy_name="default", repo_uid=UID, repo_gid=GID))
    store.transition("rj", Status.queued, Status.running, attempts=1, start_ns=start_ns, started_at=utcnow())
    store.transition("rj", Status.running, Status.testing)
    upper = settings.job_dir("rj") / "layers" / "upper"
    write(upper / "a.txt", "A\n")
    write(upper / "b.txt", "B\n")
    whiteout(upper / "c.txt")
    store.transition("rj", Status.testing, Status.awaiting_review, reason="review", review_since=utcnow(),
                     review_reasons=[{"trigger": "always", "message": "always"}])
    yield store, settings, repo
    store.close()


def test_approve_applies_everything_and_records_who(pending_job):
    store, settings, repo = pending_job
    job = review.approve(store, settings, "rj", note="looks right", by="alice")
    assert job.status == Status.succeeded and job.reason == "committed"
    assert (repo / "a.txt").read_text() == "A\n" and (repo / "b.txt").read_text() == "B\n"
    assert not (repo / "c.txt").exists()
    assert (repo / "a.txt").stat().st_uid == UID
    assert not settings.job_dir("rj").exists()
    assert (job.reviewed_by, job.review_note) == ("alice", "looks right") and job.reviewed_at is not None
    [event] = [e.data for e in store.events(job_id="rj") if e.kind == "review"]
    assert event["action"] == "approve" and event["by"] == "alice" and event["note"] == "looks right"
    assert event["outcome"] == "approved" and event["at"]
    with pytest.raises(ReviewError, match="not awaiting review"):
        review.approve(store, settings, "rj", by="eve")
    stats = review.review_stats(store.jobs())
    assert stats["reviewed"] == 1 and stats["review_share"] == 1.0 and stats["mean_review_wait_seconds"] is not None


def test_partial_approve_applies_only_the_chosen_files(pending_job):
    store, settings, repo = pending_job
    job = review.approve(store, settings, "rj", files=["b.txt"], by="bob")
    assert job.status == Status.succeeded and job.changed_files == ["b.txt"] and job.review_files == ["b.txt"]
    assert (repo / "a.txt").read_text() == "a\n" and (repo / "b.txt").read_text() == "B\n"
    assert (repo / "c.txt").read_text() == "c\n"


def test_approve_after_a_conflicting_edit_applies_nothing_and_names_the_paths(pending_job):
    store, settings, repo = pending_job
    (repo / "b.txt").write_text("a person's edit\n")
    with pytest.raises(Conflict) as caught:
        review.approve(store, settings, "rj", by="carol")
    assert caught.value.paths == ["b.txt"] and "b.txt" in str(caught.value)
    assert (repo / "a.txt").read_text() == "a\n" and (repo / "c.txt").read_text() == "c\n"
    assert (repo / "b.txt").read_text() == "a person's edit\n"
    job = store.get("rj")
    assert job.status == Status.failed and job.reason == "conflict"
    assert (settings.job_dir("rj") / "layers" / "upper").is_dir()  # kept for inspection
    [event] = [e.data for e in store.events(job_id="rj") if e.kind == "review"]
    assert event["outcome"] == "conflict" and event["paths"] == ["b.txt"]


def test_partial_approve_beside_a_conflict_elsewhere_applies(pending_job):
    store, settings, repo = pending_job
    (repo / "b.txt").write_text("edited\n")
    job = review.approve(store, settings, "rj", files=["a.txt"], by="erin")
    assert job.status == Status.succeeded and (repo / "a.txt").read_text() == "A\n"
    assert (repo / "b.txt").read_text() == "edited\n"


def test_reject_discards_and_leaves_the_repository_alone(pending_job):
    store, settings, repo = pending_job
    before = {p.name: p.read_bytes() for p in repo.iterdir()}
    job = review.reject(store, settings, "rj", note="wrong approach", by="dave")
    assert job.status == Status.rolled_back and job.reason == "rejected" and "dave" in job.error
    assert {p.name: p.read_bytes() for p in repo.iterdir()} == before
    assert not settings.job_dir("rj").exists()
    [event] = [e.data for e in store.events(job_id="rj") if e.kind == "review"]
    assert (event["action"], event["by"], event["note"]) == ("reject", "dave", "wrong approach")
    with pytest.raises(ReviewError):
        review.reject(store, settings, "rj", by="frank")


def test_two_reviewers_cannot_both_win(pending_job):
    store, settings, repo = pending_job
    results: list[str] = []
    barrier = threading.Barrier(2)

    def act(fn):
        barrier.wait()
        try:
            results.append(fn(store, settings, "rj", by="racer").status.value)
        except ReviewError as exc:
            results.append(f"refused: {exc}")

    threads = [threading.Thread(target=act, args=(review.approve,)), threading.Thread(target=act, args=(review.reject,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # both answered: one won, the other was refused cleanly (never an unhandled error of a half-read change)
    assert len(results) == 2 and len([r for r in results if not r.startswith("refused")]) == 1, results
    final = store.get("rj").status
    assert final in (Status.succeeded, Status.rolled_back)
    if final == Status.rolled_back:
        assert (repo / "a.txt").read_text() == "a\n"
    else:
        assert (repo / "a.txt").read_text() == "A\n"


def test_a_reject_landing_while_an_approve_reads_the_change_refuses_the_approve_cleanly(pending_job, monkeypatch):
    """The race of two reviewers at its worst instant: the approve has checked the job and its kept change,
    then the reject settles (and removes the change) before the approve's commit reads it."""
    from executor.review import decisions

    store, settings, repo = pending_job
    real_commit = decisions.commit

    def commit_after_a_reject(*args, **kwargs):
        review.reject(store, settings, "rj", by="bob")
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(decisions, "commit", commit_after_a_reject)
    with pytest.raises(ReviewError, match="was decided meanwhile: it is rolled_back"):
        review.approve(store, settings, "rj", by="alice")
    assert store.get("rj").reviewed_by == "bob" and (repo / "a.txt").read_text() == "a\n"


def test_cancel_of_a_job_awaiting_review(pending_job):
    store, settings, repo = pending_job
    job = store.request_cancel("rj")
    assert job.status == Status.cancelled and "review" in job.error
    assert (repo / "a.txt").read_text() == "a\n"


def test_finish_commit_redoes_only_the_approved_part(pending_job):
    """A crash after a partial approve claimed the job: the restart's commit.finish applies the same part."""
    from executor.transaction.commit import finish
    from executor.transaction.workspace import Workspace

    store, settings, repo = pending_job
    store.transition("rj", Status.awaiting_review, Status.committing, review_files=["a.txt"], changed_files=["a.txt"])
    job = store.get("rj")
    ws = Workspace.of(settings, job)
    ending = finish(store, job, ws)
    assert ending.status == Status.succeeded
    assert (repo / "a.txt").read_text() == "A\n" and (repo / "b.txt").read_text() == "b\n"
    assert (repo / "c.txt").exists()
    # A crash after the apply (a.txt was moved out of the upper dir), before the job settled: the next
    # restart finishes again, from the journal, to the same repository.
    assert ws.journal.exists() and not (ws.upper / "a.txt").exists()
    again = finish(store, job, ws)
    assert again.status == Status.succeeded
    assert (repo / "a.txt").read_text() == "A\n" and (repo / "b.txt").read_text() == "b\n"
    assert (repo / "c.txt").exists()
