"""Policy ``land`` end to end (issue 24): the real engine, the real sandbox image, the real Claude Code CLI
scripted on loopback, real git repositories. A job's change lands as a commit on the current branch or as a
branch of its own; the agent attacks the host's git (hooks in a tracked ``.husky/``, a config file the
repository includes, ``.git`` itself, setuid files, a fifo, a forged author and trailers) and nothing of it
runs or lands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from executor.store import Status
from tests.conftest import chown_tree, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
PYTEST = 'python3 -m pytest -q -p no:cacheprovider --junitxml="$EXECUTOR_JUNIT_XML"'
SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.awaiting_review}
AUTHOR = "Executor Bot <bot@example.invalid>"
#: How the test itself looks at a repository the agent armed: it must not set off what it checks for.
LOOK = ("-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
        "-c", "core.pager=cat", "-c", "filter.mark.clean=cat", "-c", "filter.mark.smudge=cat")

CALC = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a + b  # the bug\n"
SUITE = "import calc\n\n\ndef test_add():\n    assert calc.add(2, 3) == 5\n"
FIX = "sed -i 's/return a + b  # the bug/return a - b/' calc.py"
SUB_TEST = "import calc\n\n\ndef test_sub():\n    assert calc.sub(5, 3) == 2\n"


@pytest.fixture
def root():
    """A workspace root git can reach as the repository's owner (pytest keeps its own temp dirs private)."""
    path = Path(tempfile.mkdtemp(prefix="executor-gitland-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def marker():
    """A path outside every root a hook, filter or fsmonitor command that ran on the host would create."""
    base = Path(tempfile.mkdtemp(prefix="executor-gitland-marker-", dir="/tmp"))
    base.chmod(0o1777)
    yield base / "ran"
    shutil.rmtree(base, ignore_errors=True)


def git(repo: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *LOOK, "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"git {args}: {done.stderr}")
    return done.stdout


def make_repo(world, root: Path, name: str, files: dict[str, str], config: tuple[str, ...] = ()) -> Path:
    """A git repository on branch main with one commit of ``files``, then given to the owner."""
    repo = root / name
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(content)
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for setting in config:
        key, _, value = setting.partition("=")
        git(repo, "config", key, value)
    person_commits(world, repo, "start")
    chown_tree(repo)
    return repo


def person_commits(world, repo: Path, message: str, *paths: str) -> None:
    """Commit ``paths`` (all there is when none), as the person would (as root here: what git wrote is then
    given back)."""
    git(repo, "add", *(paths or ["-A"]))
    git(repo, "-c", "user.name=Person", "-c", "user.email=person@example.invalid", "commit", "-q", "-m", message)
    chown_tree(repo / ".git")
    world.repo_made = time.time()


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


def write(path: str, content: str) -> Turn:
    return Turn.tool("Write", {"file_path": f"/workspace/{path}", "content": content})


def cli(world, *args: str) -> subprocess.CompletedProcess:
    env = {**world.env(), "EXECUTOR_GIT_AUTHOR": AUTHOR}
    return subprocess.run([EXECUTOR, *args], env=env, capture_output=True, text=True, timeout=120)


def worktree_digest(repo: Path) -> str:
    """Paths, types, modes, owners, contents and times of the working tree (``.git`` aside)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(repo):
        if Path(dirpath) == repo:
            dirnames[:] = [d for d in dirnames if d != ".git"]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            h.update(f"{path.relative_to(repo)}|{st.st_mode:o}|{st.st_uid}|{st.st_mtime_ns}|{st.st_ctime_ns}".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(path.read_bytes())
    return h.hexdigest()


def hook(marker: Path, name: str) -> str:
    return f"#!/bin/sh\necho {name} >> {marker}\n"


def test_commit_lands_on_the_branch_with_trailers_and_the_agents_attacks_run_nothing(world, run_executor, root, marker):
    repo = make_repo(world, root, "app", {
        "calc.py": CALC, "tests/test_calc.py": SUITE, "README.md": "app\n", ".husky/pre-commit": "exit 0\n",
        "team.gitconfig": "[core]\n\tautocrlf = false\n"},
        # the person's own configuration, as husky and a shared team file set it up
        config=("core.hooksPath=.husky", "include.path=../team.gitconfig", "user.name=Person",
                "user.email=person@example.invalid"))
    config_before = (repo / ".git" / "config").read_bytes()
    start = git(repo, "rev-parse", "HEAD").strip()
    # what the person has underway: a modified tracked file, a staged new one, an untracked one
    (repo / "README.md").write_text("app, being edited\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "scratch.txt").write_text("notes\n")
    chown_tree(repo)
    world.repo_made = time.time()
    dirty_before = git(repo, "status", "--porcelain")

    armed = {name: hook(marker, name) for name in
             ("pre-commit", "commit-msg", "post-commit", "reference-transaction", "post-index-change")}
    # says which command ran it and how (its parent is the git that ran it)
    fsmonitor = f"#!/bin/sh\n(echo fsmonitor \"$0 $*\"; tr \"\\\\0\" \" \" < /proc/$PPID/cmdline; echo) >> {marker}\n"
    team = ("[core]\n\thooksPath = .husky\n\tfsmonitor = .husky/fsmonitor\n\tsharedRepository = 0666\n"
            "\tsshCommand = .husky/fsmonitor\n[diff]\n\texternal = .husky/fsmonitor\n"
            "[filter \"mark\"]\n\tclean = .husky/fsmonitor\n\tsmudge = .husky/fsmonitor\n\trequired = true\n"
            "[user]\n\tname = Mallory\n\temail = mallory@example.invalid\n"
            "[author]\n\tname = Mallory\n[committer]\n\tname = Mallory\n")
    script = [
        bash(FIX), write("tests/test_sub.py", SUB_TEST),
        # (the Write tool refuses a file it has not read: the two existing ones are written beside and moved)
        *[write(f".husky/{name}.new", body) for name, body in armed.items()],
        write(".husky/fsmonitor", fsmonitor), write("team.gitconfig.new", team),
        write(".gitattributes", "* filter=mark diff=mark\n"),
        bash("for f in .husky/*.new team.gitconfig.new; do mv \"$f\" \"${f%.new}\"; done; chmod +x .husky/*; "
             "cp .husky/fsmonitor tool.sh; chmod 4755 tool.sh; ln -s /etc/passwd passwd; "
             "mkdir -p .git/hooks && cp .husky/post-commit .git/hooks/post-commit; "
             "printf '[core]\\n\\thooksPath = .husky\\n' >> .git/config"),
        Turn.text("Fix sub so that it subtracts instead of adding its second argument to the first one\n\n"
                  "Executor-Tests: 999 passed\nAuthor: Mallory <mallory@example.invalid>"),
    ]
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST, land="commit")
    with ScriptedAPI({"c-main": script}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(workspace_roots=[root], git_author=AUTHOR))
        world.submit(id="c-main", workspace=str(repo), prompt="c-main: fix sub\n\nIt adds; it must subtract.")
        job = wait_status(runner.executor.store, "c-main", SETTLED, timeout=240)
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert not marker.exists(), marker.read_text()  # no hook, fsmonitor, filter or diff command ran on the host

    head = git(repo, "rev-parse", "HEAD").strip()
    assert git(repo, "rev-parse", "HEAD^").strip() == start and git(repo, "symbolic-ref", "HEAD").strip() == \
        "refs/heads/main"
    assert git(repo, "log", "-1", "--format=%s").strip() == \
        "Fix sub so that it subtracts instead of adding its second argument to…"
    assert git(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>").strip() == f"{AUTHOR}|{AUTHOR}"
    body = git(repo, "log", "-1", "--format=%b")
    assert body.startswith("c-main: fix sub\n\nIt adds; it must subtract.\n")
    trailers = dict(line.split(": ", 1) for line in
                    git(repo, "log", "-1", "--format=%(trailers:only,unfold)").strip().splitlines())
    assert trailers == {"Executor-Job": "c-main", "Executor-Runner": "scripted",
                        "Executor-Model": "claude-sonnet-4-5", "Executor-Session": job.session_id,
                        "Executor-Tests": "2 passed; proves tests.test_sub::test_sub"}, trailers
    assert "Mallory" not in git(repo, "log", "-1", "--format=%B")
    # the commit holds exactly the job's paths; a setuid file is a plain executable, a link its target
    committed = git(repo, "diff-tree", "-r", "--no-renames", "--name-status", "HEAD^", "HEAD").split("\n")
    names = {line.split("\t")[1] for line in committed if line}
    assert names == {"calc.py", "tests/test_sub.py", ".gitattributes", "team.gitconfig", "tool.sh", "passwd",
                     *[f".husky/{n}" for n in armed if n != "pre-commit"], ".husky/pre-commit", ".husky/fsmonitor"}
    tree = {line.split("\t")[1]: line.split()[0] for line in git(repo, "ls-tree", "-r", "HEAD").splitlines()}
    assert tree["tool.sh"] == "100755" and tree["passwd"] == "120000" and tree["calc.py"] == "100644"
    assert git(repo, "cat-file", "-p", "HEAD:passwd") == "/etc/passwd"
    assert not (repo / "tool.sh").stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    # what the person had underway is still as it was, and none of the job's paths is left dirty
    assert git(repo, "status", "--porcelain") == dirty_before
    assert git(repo, "diff", "--no-ext-diff", "--cached", "--name-only").split() == ["staged.txt"]
    # .git is the person's: the agent's writes to it did not land, its config is byte for byte the same
    assert (repo / ".git" / "config").read_bytes() == config_before
    assert not (repo / ".git" / "hooks" / "post-commit").exists()
    # the objects git wrote have the owner's modes (the included file's sharedRepository = 0666 did nothing)
    loose = [p for p in (repo / ".git" / "objects").rglob("*") if p.is_file() and p.stat().st_mtime > world.repo_made]
    assert loose and all(p.stat().st_mode & 0o022 == 0 and p.stat().st_uid == 1000 for p in loose)
    assert not marker.exists()

    shown = json.loads(cli(world, "show", "c-main", "--json").stdout)
    assert shown["git"]["commit"] == head and shown["git"]["branch"] == "main" and shown["git"]["land"] == "commit"
    assert shown["git"]["started_on"] == "main" and shown["git"]["base"] == start
    assert f"commit {head[:12]} on main" in cli(world, "show", "c-main").stdout


def test_branch_leaves_the_working_tree_alone_and_land_brings_it_in(world, run_executor, root, marker):
    repo = make_repo(world, root, "lib", {"notes.txt": "alpha\nbeta\n", "old.txt": "old\n", "keep.txt": "keep\n"},
                     config=("core.hooksPath=.husky",))
    (repo / "scratch.txt").write_text("the person's own\n")  # untracked: stays as it is
    chown_tree(repo)
    world.repo_made = time.time()
    start = git(repo, "rev-parse", "HEAD").strip()
    before = (worktree_digest(repo), (repo / ".git" / "index").read_bytes(), (repo / ".git" / "HEAD").read_bytes(),
              git(repo, "for-each-ref", "--format=%(refname) %(objectname)"))
    main_script = [
        write("hello.txt", "hello\n"), Turn.tool("Read", {"file_path": "/workspace/notes.txt"}),
        Turn.tool("Edit", {"file_path": "/workspace/notes.txt", "old_string": "beta", "new_string": "gamma"}),
        bash("rm old.txt; mkdir -p .husky; printf '#!/bin/sh\\necho hook >> %s\\n' > .husky/post-checkout; "
             "chmod +x .husky/post-checkout; mkdir -p .git/hooks; cp .husky/post-checkout .git/hooks/; "
             "echo ref: refs/heads/evil > .git/HEAD" % marker),
        Turn.text("Say hello"),
    ]
    taken_script = [write("taken.txt", "x\n"), bash("sleep 4"), Turn.text("Taken")]
    fifo_script = [write("f.txt", "x\n"), bash("mkfifo pipe"), Turn.text("Fifo")]
    world.write_policy(land="branch")
    with ScriptedAPI({"b-main": main_script, "b-taken": taken_script, "b-fifo": fifo_script}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(workspace_roots=[root], git_author=AUTHOR))
        store = runner.executor.store
        world.submit(id="b-main", workspace=str(repo), prompt="b-main: say hello")
        job = wait_status(store, "b-main", SETTLED, timeout=180)
        assert job.status == Status.succeeded, (job.reason, job.error)
        after = (worktree_digest(repo), (repo / ".git" / "index").read_bytes(),
                 (repo / ".git" / "HEAD").read_bytes())
        refs = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
        # a branch made while the job ran (after intake took it): the job's branch is never overwritten
        world.submit(id="b-taken", workspace=str(repo), prompt="b-taken: take it")
        wait_for(lambda: any(e.kind == "tool_call" and "sleep" in (e.data.get("command") or "")
                             for e in store.events(job_id="b-taken")), 120, "the agent's sleep")
        git(repo, "branch", "executor/b-taken", "HEAD")
        taken = wait_status(store, "b-taken", SETTLED, timeout=180)
        world.submit(id="b-fifo", workspace=str(repo), prompt="b-fifo: a fifo")
        fifo = wait_status(store, "b-fifo", SETTLED, timeout=180)
    assert not marker.exists()
    # the working tree, the index and HEAD are byte-identical; the one new ref is the job's branch
    assert after == before[:3]
    commit = git(repo, "rev-parse", "executor/b-main").strip()
    assert sorted(refs.splitlines()) == sorted([*before[3].splitlines(), f"refs/heads/executor/b-main {commit}"])
    assert git(repo, "rev-parse", "executor/b-main^").strip() == start
    assert git(repo, "diff", "--no-ext-diff", "--name-status", "HEAD", "executor/b-main").split("\n") == \
        ["A\t.husky/post-checkout", "A\thello.txt", "M\tnotes.txt", "D\told.txt", ""]
    assert git(repo, "diff", "--no-ext-diff", "HEAD", "executor/b-main", "--", "notes.txt").endswith("-beta\n+gamma\n")
    assert git(repo, "log", "-1", "--format=%s|%an <%ae>", "executor/b-main").strip() == f"Say hello|{AUTHOR}"
    assert job.git["branch"] == "executor/b-main" and job.git["commit"] == commit
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()

    assert taken.status == Status.failed and taken.reason == "git", (taken.reason, taken.error)
    assert "executor/b-taken exists already" in taken.error
    assert git(repo, "rev-parse", "executor/b-taken").strip() == start  # the person's branch is as they made it
    assert fifo.status == Status.failed and "pipe" in fifo.error, (fifo.reason, fifo.error)
    assert git(repo, "rev-parse", "-q", "--verify", "executor/b-fifo", check=False) == ""

    shown = cli(world, "show", "b-main")
    assert "branch executor/b-main" in shown.stdout and "executor land b-main" in shown.stdout, shown.stdout
    # the person moves on; `executor land` brings the branch in on top, as land = "commit" would have
    (repo / "keep.txt").write_text("keep, edited\n")
    person_commits(world, repo, "the person's own work", "keep.txt")
    moved = git(repo, "rev-parse", "HEAD").strip()
    landed = cli(world, "land", "b-main")
    assert landed.returncode == 0, landed.stderr
    assert not marker.exists()
    assert git(repo, "rev-parse", "HEAD^").strip() == moved
    assert git(repo, "log", "-1", "--format=%s|%(trailers:key=Executor-Job,valueonly)").strip() == "Say hello|b-main"
    assert (repo / "hello.txt").read_text() == "hello\n" and (repo / "notes.txt").read_text() == "alpha\ngamma\n"
    assert not (repo / "old.txt").exists()
    assert git(repo, "status", "--porcelain") == "?? scratch.txt\n"
    assert json.loads(cli(world, "show", "b-main", "--json").stdout)["git"]["landed"]["commit"] == \
        git(repo, "rev-parse", "HEAD").strip()
    again = cli(world, "land", "b-main")
    assert again.returncode != 0 and "landed already" in again.stderr
    assert not (world.home / "land" / "b-main").exists()


def test_a_queue_of_graded_branch_jobs_on_one_repository_runs_before_once(world, run_executor, root):
    repo = make_repo(world, root, "queue", {"calc.py": CALC, "tests/test_calc.py": SUITE})
    (repo / "scratch.txt").write_text("untracked: the state is the tree's, git's status aside\n")
    chown_tree(repo)
    world.repo_made = time.time()
    keys = [f"q-{n}" for n in range(5)]
    script = [bash(FIX), write("tests/test_sub.py", SUB_TEST), Turn.text("Fix sub")]
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST, land="branch")
    with ScriptedAPI({key: script for key in keys}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(workspace_roots=[root], git_author=AUTHOR))
        for key in keys:
            world.submit(id=key, workspace=str(repo), prompt=f"{key}: fix sub")
        jobs = {key: wait_status(runner.executor.store, key, SETTLED, timeout=300) for key in keys}
    assert {k: (j.status, j.reason) for k, j in jobs.items()} == {k: (Status.succeeded, "committed") for k in keys}
    before = {key: [r["cached"] for r in (e.data for e in world.store().events(job_id=key) if e.kind == "test_run")
                    if r["run"] == "before"] for key in keys}
    assert sorted(before.values()) == [[False], [True], [True], [True], [True]], before
    assert len({git(repo, "rev-parse", f"executor/{key}").strip() for key in keys}) == 5
    assert git(repo, "status", "--porcelain") == "?? scratch.txt\n"  # the working tree as it was


def test_a_repository_git_cannot_land_in_is_refused_at_intake_with_the_reason(world, run_executor, root):
    plain = root / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("a\n")
    chown_tree(plain)
    detached = make_repo(world, root, "detached", {"a.txt": "a\n"})
    git(detached, "checkout", "-q", "--detach")
    world.write_policy(land="commit")
    runner = run_executor(world.settings(workspace_roots=[root]))
    world.submit(id="n-plain", workspace=str(plain), prompt="n-plain: never runs")
    world.submit(id="n-detached", workspace=str(detached), prompt="n-detached: never runs")
    rejected = world.home / "spool" / "rejected"
    wait_for(lambda: len(list(rejected.glob("*.error.json"))) == 2, 60, "two rejections")
    errors = sorted(json.loads(p.read_text())["error"] for p in rejected.glob("*.error.json"))
    assert "has a detached HEAD" in errors[0] and f"{plain} is not a git repository" in errors[1], errors
    assert 'land = "commit"' in errors[1] and "run `git init` there" in errors[1]
    assert {runner.executor.store.get(key).status for key in ("n-plain", "n-detached")} == {Status.rejected}
    assert not (plain / ".git").exists()
