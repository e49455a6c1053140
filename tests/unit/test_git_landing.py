"""Policy ``land`` (issue 24) without Docker: the commit message and its trailers, the author setting, what
show and notifications say, the ignore rules as the job left them, intake's refusals, and the plumbing of
``transaction/landing.py`` and ``git.Git`` on real git repositories with hand-built upper dirs, attacked
through a configuration file the repository includes (which a job can write)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from executor import review
from executor.clock import utcnow
from executor.errors import Conflict, GitError, InvalidJob, ReviewError
from executor.intake.jobs import parse_spec, validate
from executor.settings import Settings, parse_author
from executor.store import Job, Status, Store
from executor.surfaces.git_view import git_line, git_view
from executor.surfaces.notify import payload
from executor.surfaces.web.views import decision
from executor.transaction import landing
from executor.transaction.git import Git
from executor.transaction.gitignore import Ignored
from executor.transaction import gitmessage
from executor.transaction.gitmessage import message, subject
from executor.transaction.journal import load
from executor.transaction.safefs import DIR_FLAGS
from executor.transaction.tree import Tree
from executor.transaction.upper import scan_upper
from executor.transaction.workspace import Workspace
from tests.conftest import chown_tree
from tests.unit.upper_tree import OWNER, require_root, whiteout, write

LOOK = ("-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false")
AUTHOR = "Bot <bot@example.invalid>"


# ------------------------------------------------------------------------------------------ the message


@pytest.mark.parametrize("text, expected", [
    ("Fix the parser\n\nmore", "Fix the parser"),
    ("## **Done:** fixed it", "Done:** fixed it"),
    ("\n\n   \n- Added a test", "Added a test"),
    ("REVIEW: unsure\nRenamed the module", "Renamed the module"),
    ("", "executor job j1"),
    (None, "executor job j1"),
    ("word " * 30, ("word " * 14).strip() + "…"),
    ("x" * 100, "x" * 71 + "…"),
])
def test_the_subject_is_the_first_line_that_says_something_at_most_72_characters(text, expected):
    found = subject(text, "j1")
    assert found == expected and len(found) <= 72 and "\n" not in found


def job_of(**fields) -> Job:
    values = dict(id="j1", runner="sonnet", prompt="Fix sub.\n\nIt adds.", workspace="/r", session_id="s1",
                  policy={"land": "commit"}, model_requested="claude-x", models_seen=["claude-x-2025"],
                  final_text="Fixed sub\nExecutor-Tests: 999 passed\nAuthor: Mallory <m@x>")
    values.update(fields)
    return Job(**values)


def test_the_message_has_the_prompt_as_body_and_five_trailers_no_line_of_the_agent_can_forge():
    job = job_of(evaluation={"kind": "code", "verdict": "passed", "passed": 12,
                             "fail_to_pass": ["t::test_add"]})
    text = message(job)
    head, body, trailers = text.split("\n\n", 1)[0], text.split("\n\n")[1:3], text.rstrip("\n").split("\n\n")[-1]
    assert head == "Fixed sub" and body == ["Fix sub.", "It adds."]
    assert trailers.split("\n") == ["Executor-Job: j1", "Executor-Runner: sonnet", "Executor-Model: claude-x-2025",
                                    "Executor-Session: s1", "Executor-Tests: 12 passed; proves t::test_add"]
    assert "999" not in text and "Mallory" not in text
    # a trailer never carries a line break, whatever a value holds; a long prompt is cut
    forged = message(job_of(runner="a\nExecutor-Tests: forged", prompt="p" * 40_000, reviewed_by="eve\nX: y"))
    assert "Executor-Runner: a Executor-Tests: forged\n" in forged and "Executor-Reviewed-By: eve X: y\n" in forged
    assert len(forged) < 17_000 and "[the prompt goes on: 40000 characters in all]" in forged


def test_the_tests_trailer_says_the_gates_verdict():
    assert gitmessage.tests_line(job_of(test_exit_code=0, test_command="make test")) == "make test exited 0"
    assert gitmessage.tests_line(job_of()) == "not run"
    many = job_of(evaluation={"kind": "code", "verdict": "passed", "passed": 3, "fail_to_pass": list("abcde")})
    assert gitmessage.tests_line(many) == "3 passed; proves a, b, c and 2 more"
    weak = job_of(evaluation={"kind": "code", "verdict": "weak_tests", "passed": 2, "fail_to_pass": []})
    assert gitmessage.tests_line(weak) == "2 passed; no test of its own; weak_tests (approved in review)"


def test_the_author_is_name_and_email_and_a_bad_one_is_refused_with_the_form():
    assert parse_author(" Exec Bot <bot@host> ") == ("Exec Bot", "bot@host")
    for bad in ("bot@host", "<bot@host>", "Bot <a b@host>", "Bot <bot@host> extra", "Bot\n <b@h>"):
        with pytest.raises(ValueError, match="write it as Name <email>"):
            parse_author(bad)
    with pytest.raises(ValidationError, match="Name <email>"):
        Settings(git_author="nobody")
    assert Settings().git_author.startswith("executor <executor@")


# ---------------------------------------------------------------------------------- what people are shown


def test_show_the_review_page_and_notifications_name_the_branch():
    record = {"mode": "branch", "ref": "refs/heads/main", "base": "a" * 40, "branch": "executor/j1",
              "commit": "b" * 40, "parent": "a" * 40, "note": None}
    assert git_line(record, "j1") == \
        "branch executor/j1 (commit bbbbbbbbbbbb); `executor land j1` brings it into the working tree"
    view = git_view(record, "j1")
    assert view["land_command"] == "executor land j1" and view["started_on"] == "main"
    job = job_of(status=Status.succeeded, reason="committed", git=record)
    body = payload(job)
    assert body["branch"] == "executor/j1" and body["commit"] == "b" * 40 and "executor/j1" in body["message"]
    landed = {**record, "landed": {"branch": "main", "commit": "c" * 40}}
    assert git_line(landed, "j1") == "branch executor/j1 (commit bbbbbbbbbbbb), landed as commit cccccccccccc on main"
    assert git_view(landed, "j1")["land_command"] is None
    assert git_line({"mode": "commit", "branch": "main", "commit": "d" * 40}, "j1") == "commit dddddddddddd on main"
    assert git_line(None, "j1") is None and git_view(None, "j1") is None and payload(job_of())["branch"] is None
    approved = job_of(status=Status.succeeded, reason="committed", git=record, reviewed_at=utcnow(), reviewed_by="al")
    assert decision(approved)["text"] == \
        "Approved by al. The change is on the branch executor/j1; the working tree was not touched."


# -------------------------------------------------------------------------------------- real repositories


@pytest.fixture
def root():
    require_root()
    path = Path(tempfile.mkdtemp(prefix="executor-gitunit-", dir="/tmp"))
    path.chmod(0o711)  # git runs as the owner, who must reach the repository
    yield path
    shutil.rmtree(path, ignore_errors=True)


def git(repo: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *LOOK, "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"git {args}: {done.stderr}")
    return done.stdout


def repo_of(root: Path, files: dict[str, str], *config: str, name: str = "repo") -> Path:
    repo = root / name
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(content)
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for setting in config:
        git(repo, "config", *setting.split("=", 1))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-q", "--allow-empty", "-m", "start")
    chown_tree(repo, OWNER)
    return repo


def test_intake_refuses_land_in_git_where_git_cannot_take_it(root: Path, tmp_path: Path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "runners.toml").write_text('[runners.scripted]\nmodel = "m"\nauth_env = "T"\n')
    for mode in ("files", "commit", "branch"):
        (policies / f"{mode}.toml").write_text(f'land = "{mode}"\n')
    settings = Settings(home=tmp_path / "home", policies=policies, workspace_roots=[root])

    def judged(repo: Path, policy: str, job_id: str = "j1") -> str | None:
        raw = json.dumps({"runner": "scripted", "prompt": "p", "workspace": str(repo), "policy": policy, "id": job_id})
        try:
            validate(parse_spec(raw.encode()), settings)
        except InvalidJob as exc:
            return str(exc)
        return None

    plain = root / "plain"
    plain.mkdir()
    chown_tree(plain, OWNER)
    assert judged(plain, "files") is None
    for mode in ("commit", "branch"):
        assert f"policy '{mode}' has land = \"{mode}\", but {plain} is not a git repository" in judged(plain, mode)
        assert "run `git init` there" in judged(plain, mode)
    repo = repo_of(root, {"a.txt": "a\n"})
    assert judged(repo, "commit") is None and judged(repo, "branch") is None
    git(repo, "checkout", "-q", "--detach")
    assert "has a detached HEAD" in judged(repo, "commit") and judged(repo, "branch") is None
    git(repo, "checkout", "-q", "main")
    (repo / ".git" / "MERGE_HEAD").write_text(git(repo, "rev-parse", "HEAD"))
    assert "in the middle of a merge" in judged(repo, "commit")
    (repo / ".git" / "MERGE_HEAD").unlink()
    (repo / ".git" / "rebase-merge").mkdir()
    assert "in the middle of a rebase" in judged(repo, "commit")
    (repo / ".git" / "rebase-merge").rmdir()
    git(repo, "branch", "executor/j2")
    assert "a branch executor/j2 exists already" in judged(repo, "branch", "j2")
    assert "cannot name the branch" in judged(repo, "branch", "j3.lock")
    assert judged(repo, "commit", "j2") is None


def upper_of(root: Path, files: dict[str, str | None]) -> Path:
    """An overlay upper dir holding ``files`` (None: a whiteout)."""
    upper = root / "job" / "layers" / "upper"
    upper.mkdir(parents=True)
    os.chown(upper, OWNER, OWNER)
    for rel, content in files.items():
        if content is None:
            whiteout(upper / rel)
        else:
            write(upper / rel, content)
    return upper


def landed(root: Path, repo: Path, mode: str, files: dict[str, str | None], base: str | None = None):
    """Land ``files`` as the commit sequence does (prepare, journal, apply elsewhere, finish)."""
    upper_of(root, files)
    job = job_of(policy={"land": mode}, git={"mode": mode, "ref": "refs/heads/main", "base": base})
    ws = Workspace(job_id="j1", attempt=1, repo=repo, root=root / "job", uid=OWNER, gid=OWNER, git_author=AUTHOR)
    change = scan_upper(ws.upper)
    fd = os.open(repo, DIR_FLAGS)
    try:
        plan = landing.prepare(job, ws, change, fd)
        return landing.finish(Git(fd, OWNER, OWNER), plan, None, None)
    finally:
        os.close(fd)


def test_a_branch_is_built_with_plumbing_from_the_upper_dir_and_nothing_else_moves(root: Path):
    repo = repo_of(root, {"a.txt": "a\n", "gone.txt": "g\n", ".gitignore": "*.pyc\nbuild/\n"})
    start = git(repo, "rev-parse", "HEAD").strip()
    index, head = (repo / ".git" / "index").read_bytes(), (repo / ".git" / "HEAD").read_bytes()
    done = landed(root, repo, "branch", {"a.txt": "A\n", "new/b.txt": "b\n", "gone.txt": None, "x.pyc": "bytecode",
                                         "build/out": "o", "new/.gitignore": "!keep.pyc\n", "new/keep.pyc": "k"},
                  base=start)
    assert done.branch == "executor/j1" and git(repo, "rev-parse", "executor/j1").strip() == done.commit
    assert git(repo, "diff", "--name-status", "main", "executor/j1").split("\n") == \
        ["M\ta.txt", "D\tgone.txt", "A\tnew/.gitignore", "A\tnew/b.txt", "A\tnew/keep.pyc", ""]
    assert done.note == "left out of the commit: 2 path(s) git ignores (build/out, x.pyc)"
    assert (repo / ".git" / "index").read_bytes() == index and (repo / ".git" / "HEAD").read_bytes() == head
    assert (repo / "a.txt").read_text() == "a\n" and git(repo, "rev-parse", "HEAD").strip() == start
    # finishing again (a crash after the ref moved) makes no second commit
    fd = os.open(repo, DIR_FLAGS)
    try:
        assert landing.finish(Git(fd, OWNER, OWNER), landing.Landing(**{**done.__dict__, "stage": "built"}),
                              None, None).commit == done.commit
    finally:
        os.close(fd)


def test_commit_mode_commits_only_the_jobs_paths_and_keeps_what_else_is_staged(root: Path):
    repo = repo_of(root, {"a.txt": "a\n", "b.txt": "b\n"})
    (repo / "b.txt").write_text("b, the person's edit\n")
    (repo / "staged.txt").write_text("s\n")
    git(repo, "add", "staged.txt")
    chown_tree(repo, OWNER)
    (repo / "a.txt").write_text("A\n")  # the apply's part, done here by hand
    done = landed(root, repo, "commit", {"a.txt": "A\n"})
    assert git(repo, "rev-parse", "HEAD").strip() == done.commit
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["a.txt"]
    assert git(repo, "log", "-1", "--format=%an <%ae> %cn <%ce>").strip() == f"{AUTHOR} {AUTHOR}"
    assert git(repo, "status", "--porcelain") == " M b.txt\nA  staged.txt\n"


def test_included_config_a_job_wrote_runs_nothing_and_widens_nothing(root: Path):
    marker = root / "ran"
    hostile = ("[core]\n\thooksPath = .husky\n\tfsmonitor = ./evil\n\tsharedRepository = 0666\n"
               "\talternateRefsCommand = ./evil\n[diff]\n\texternal = ./evil\n[filter \"x\"]\n\tclean = ./evil\n"
               "\tsmudge = ./evil\n\trequired = true\n[protocol \"ext\"]\n\tallow = always\n"
               "[remote \"origin\"]\n\turl = ext::./evil\n\tpromisor = true\n[color]\n\tui = always\n"
               "[diff]\n\trenames = copies\n[user]\n\tname = Mallory\n\temail = m@x\n")
    evil = f"#!/bin/sh\necho ran >> {marker}\nexit 1\n"
    repo = repo_of(root, {"a.txt": "a\n", "old.txt": "o\n", "c.txt": "c\n"}, "include.path=../team.gitconfig")
    for rel, body in (("team.gitconfig", hostile), ("evil", evil), (".gitattributes", "* filter=x diff=x\n"),
                      *[(f".husky/{h}", evil) for h in ("reference-transaction", "post-index-change", "pre-commit")]):
        (repo / rel).parent.mkdir(exist_ok=True)
        (repo / rel).write_text(body)
        (repo / rel).chmod(0o755)
    # the person's index holds them; one entry racily clean (written in the index's second): git writing the
    # index would read that file again, through the clean filter the job's .gitattributes names
    git(repo, "-c", "filter.x.clean=cat", "-c", "filter.x.required=false", "add", "-A")
    chown_tree(repo, OWNER)
    racy = (repo / "c.txt").stat().st_mtime_ns
    os.utime(repo / ".git" / "index", ns=(racy, racy))
    root.chmod(0o1777)  # the marker's directory: a command that ran as the owner could write it
    done = landed(root, repo, "commit", {"a.txt": "A\n", "old.txt": None, "b.txt": "b\n"})
    assert not marker.exists()
    assert git(repo, "rev-parse", "HEAD").strip() == done.commit
    assert git(repo, "log", "-1", "--format=%an").strip() == "Bot"
    objects = [p for p in (repo / ".git" / "objects").rglob("*") if p.is_file()]
    assert objects and all(not p.stat().st_mode & 0o022 for p in objects)


def test_a_branch_that_exists_is_never_overwritten_and_git_never_runs_as_root(root: Path):
    repo = repo_of(root, {"a.txt": "a\n"})
    start = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "branch", "executor/j1")
    chown_tree(repo, OWNER)
    with pytest.raises(GitError, match="a branch executor/j1 exists already"):
        landed(root, repo, "branch", {"a.txt": "A\n"}, base=start)
    assert git(repo, "rev-parse", "executor/j1").strip() == start
    fd = os.open(repo, DIR_FLAGS)
    try:
        with pytest.raises(GitError, match="refusing to run git as root"):
            Git(fd, 0, 0).head()
    finally:
        os.close(fd)


def test_the_ignore_rules_are_the_ones_the_job_left(root: Path):
    repo = repo_of(root, {".gitignore": "*.log\nout/\n", "sub/.gitignore": "!keep.log\n"})
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text("secret.txt\n")
    upper = upper_of(root, {"a.log": "x", "sub/keep.log": "k", "out/x": "x", "secret.txt": "s", "src/.gitignore":
                            "gen/\n", "src/gen/g.py": "g", "src/ok.py": "k", "new.log": "n",
                            ".gitignore": "out/\n"})  # the job's own .gitignore no longer ignores *.log
    change = scan_upper(upper)
    ufd, rfd = os.open(upper, DIR_FLAGS), os.open(repo, DIR_FLAGS)
    try:
        ignored = Ignored(change, Tree(ufd), Tree(rfd))
        verdicts = {p: ignored(p) for p in ("a.log", "sub/keep.log", "out/x", "secret.txt", "src/gen/g.py",
                                            "src/ok.py", "new.log")}
    finally:
        os.close(ufd)
        os.close(rfd)
    assert verdicts == {"a.log": False, "sub/keep.log": False, "out/x": True, "secret.txt": True,
                        "src/gen/g.py": True, "src/ok.py": False, "new.log": False}


def test_the_journal_keeps_the_git_plan(root: Path):
    repo = repo_of(root, {"a.txt": "a\n"})
    upper_of(root, {"a.txt": "A\n"})
    job = job_of(policy={"land": "branch"}, git={"mode": "branch", "ref": "refs/heads/main",
                                                   "base": git(repo, "rev-parse", "HEAD").strip()})
    ws = Workspace(job_id="j1", attempt=1, repo=repo, root=root / "job", uid=OWNER, gid=OWNER, git_author=AUTHOR)
    fd = os.open(repo, DIR_FLAGS)
    try:
        plan = landing.prepare(job, ws, scan_upper(ws.upper), fd)
        from executor.transaction.journal import Plan, save
        save(ws.journal, Plan([], git=plan.__dict__.copy()))
        done = landing.finish(Git(fd, OWNER, OWNER), plan, ws.journal, load(ws.journal))
    finally:
        os.close(fd)
    kept = load(ws.journal)
    assert kept.git["stage"] == "done" and kept.git["commit"] == done.commit
    assert stat.S_IMODE(os.stat(ws.journal).st_mode) & 0o022 == 0


def test_commit_mode_rebuilds_on_a_branch_that_moved_and_a_second_finish_makes_no_second_commit(root: Path):
    repo = repo_of(root, {"a.txt": "a\n", "b.txt": "b\n"})
    upper_of(root, {"a.txt": "A\n"})
    job = job_of(policy={"land": "commit"}, git={"mode": "commit", "ref": "refs/heads/main", "base": None})
    ws = Workspace(job_id="j1", attempt=1, repo=repo, root=root / "job", uid=OWNER, gid=OWNER, git_author=AUTHOR)
    fd = os.open(repo, DIR_FLAGS)
    try:
        plan = landing.prepare(job, ws, scan_upper(ws.upper), fd)
        # the person commits between the plan and the ref's move (the commit was built on the old tip)
        (repo / "b.txt").write_text("B\n")
        git(repo, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-qam", "person")
        chown_tree(repo, OWNER)
        theirs = git(repo, "rev-parse", "HEAD").strip()
        (repo / "a.txt").write_text("A\n")  # the apply's part
        done = landing.finish(Git(fd, OWNER, OWNER), plan, None, None)
        again = landing.finish(Git(fd, OWNER, OWNER), landing.Landing(**{**done.__dict__, "stage": "built"}),
                               None, None)
    finally:
        os.close(fd)
    assert done.commit != plan.change and done.parent == theirs and again.commit == done.commit
    assert git(repo, "rev-parse", "HEAD").strip() == done.commit and git(repo, "rev-parse", "HEAD^").strip() == theirs
    assert git(repo, "show", "HEAD:a.txt") == "A\n" and git(repo, "show", "HEAD:b.txt") == "B\n"
    assert git(repo, "log", "-1", "--format=%s").strip() == "Fixed sub" and git(repo, "status", "--porcelain") == ""


def awaiting(store, settings, repo: Path, job_id: str, mode: str, upper: dict) -> None:
    """A job of ``land = mode`` in awaiting_review with a hand-built upper dir (``upper``: path -> (text, mode)
    or a callable making the entry), as the pipeline leaves one."""
    base = git(repo, "rev-parse", "HEAD").strip()
    time.sleep(0.05)  # the conflict check allows for a coarse clock
    store.add_job(Job(id=job_id, session_id=job_id, runner="r", model_requested="m", workspace=str(repo),
                      prompt="p", policy_name="default", policy={"land": mode}, repo_uid=OWNER, repo_gid=OWNER,
                      final_text=f"Change of {job_id}", git={"mode": mode, "ref": "refs/heads/main", "base": base}))
    store.transition(job_id, Status.queued, Status.running, attempts=1, start_ns=time.time_ns(), started_at=utcnow())
    store.transition(job_id, Status.running, Status.testing)
    layer = settings.job_dir(job_id) / "layers" / "upper"
    for rel, made in upper.items():
        if callable(made):
            layer.mkdir(parents=True, exist_ok=True)
            made(layer / rel)
        else:
            write(layer / rel, made[0], made[1])
    store.transition(job_id, Status.testing, Status.awaiting_review, reason="review", review_since=utcnow(),
                     review_reasons=[{"trigger": "always", "message": "always"}])


def test_an_approved_change_lands_with_its_reviewer_and_a_device_or_setuid_bit_never_does(root: Path,
                                                                                        tmp_path: Path):
    settings = Settings(home=tmp_path / "home", policies=tmp_path / "policies", workspace_roots=[root],
                        git_author=AUTHOR)
    repo = repo_of(root, {"a.txt": "a\n"})
    store = Store(settings.db_path)
    try:
        awaiting(store, settings, repo, "ok", "commit", {"a.txt": ("A\n", None), "tool.sh": ("#!/bin/sh\n", 0o4755)})
        job = review.approve(store, settings, "ok", by="alice")
        assert job.status == Status.succeeded, job.error
        assert "Executor-Reviewed-By: alice" in git(repo, "log", "-1", "--format=%B")
        assert job.git["commit"] == git(repo, "rev-parse", "HEAD").strip() and job.git["branch"] == "main"
        assert git(repo, "ls-tree", "HEAD", "tool.sh").split()[0] == "100755"
        assert not (repo / "tool.sh").stat().st_mode & stat.S_ISUID
        head = git(repo, "rev-parse", "HEAD").strip()
        awaiting(store, settings, repo, "dev", "branch", {"b.txt": ("b\n", None),
                                                          "mem": lambda p: os.mknod(p, stat.S_IFCHR | 0o666,
                                                                                    os.makedev(1, 3))})
        with pytest.raises(ReviewError, match=r"never applied: mem \(device file"):
            review.approve(store, settings, "dev", by="alice")
        job = store.get("dev")
    finally:
        store.close()
    assert job.status == Status.failed and "mem" in job.error, (job.status, job.error)
    assert git(repo, "rev-parse", "-q", "--verify", "executor/dev", check=False) == ""
    assert git(repo, "rev-parse", "HEAD").strip() == head and not (repo / "b.txt").exists()


def test_names_git_would_quote_or_take_for_pathspec_magic_land_as_they_are(root: Path):
    repo = repo_of(root, {"a.txt": "a\n"})
    start = git(repo, "rev-parse", "HEAD").strip()
    names = ["we\nird.txt", "tab\there.txt", ":(glob)*", "-n", "\\back", os.fsdecode(b"\xff\xfe.bin"), "space d/x y"]
    done = landed(root, repo, "branch", {name: f"{i}\n" for i, name in enumerate(names)}, base=start)
    listed = subprocess.run(["git", *LOOK, "-C", str(repo), "ls-tree", "-r", "-z", "--name-only", done.commit],
                            capture_output=True, check=True).stdout.split(b"\0")
    assert sorted(p for p in listed if p) == sorted(os.fsencode(n) for n in [*names, "a.txt"])


def test_land_refuses_a_conflict_and_a_moved_branch_and_applies_nothing(root: Path, tmp_path: Path):
    from executor.review.land import land

    settings = Settings(home=tmp_path / "home", policies=tmp_path / "policies", workspace_roots=[root],
                        git_author=AUTHOR)
    repo = repo_of(root, {"a.txt": "a\n", "b.txt": "b\n"})
    base = git(repo, "rev-parse", "HEAD").strip()
    time.sleep(0.05)  # the conflict check allows for a coarse clock
    start_ns = time.time_ns()
    done = landed(root, repo, "branch", {"a.txt": "A\n"}, base=base)
    store = Store(settings.db_path)
    try:
        store.add_job(Job(id="j1", session_id="j1", runner="r", model_requested="m", workspace=str(repo), prompt="p",
                          policy_name="default", policy={"land": "branch"}, repo_uid=OWNER, repo_gid=OWNER))
        for old, new in ((Status.queued, Status.running), (Status.running, Status.testing),
                         (Status.testing, Status.committing), (Status.committing, Status.succeeded)):
            store.transition("j1", old, new, attempts=1, start_ns=start_ns, reason="committed")
        store.update_job("j1", git=done.record({"mode": "branch", "ref": "refs/heads/main", "base": base}))
        (repo / "a.txt").write_text("the person's edit\n")  # a path the branch changes
        with pytest.raises(Conflict) as caught:
            land(store, settings, "j1", by="alice")
        assert caught.value.paths == ["a.txt"]
        assert (repo / "a.txt").read_text() == "the person's edit\n" and git(repo, "rev-parse", "HEAD").strip() == base
        assert not (settings.home / "land" / "j1").exists() and not store.get("j1").git.get("landed")
        git(repo, "branch", "-f", "executor/j1", base)  # the branch moved since the job made it
        with pytest.raises(ReviewError, match="moved since job j1 made it"):
            land(store, settings, "j1", by="alice")
        store.update_job("j1", git={**store.get("j1").git, "mode": "commit"})
        with pytest.raises(ReviewError, match="not a succeeded job of a policy with land = \"branch\""):
            land(store, settings, "j1", by="alice")
    finally:
        store.close()
    assert git(repo, "rev-parse", "HEAD").strip() == base and git(repo, "status", "--porcelain") == " M a.txt\n"
