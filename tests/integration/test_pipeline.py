"""End to end through the spool: the real engine, the real sandbox image, the real Claude Code CLI,
a scripted Messages API on loopback, a real SQLite file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from executor.intake.spool import Spool
from executor.store import Status
from tests.conftest import chown_tree, tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn


def test_agent_writes_and_edits_then_tests_pass_commits(world, run_executor):
    repo = world.repo("app", {"notes.txt": "alpha\nbeta\n"})
    script = [
        Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hello world\n"}),
        Turn.tool("Read", {"file_path": "/workspace/notes.txt"}),
        Turn.tool("Edit", {"file_path": "/workspace/notes.txt", "old_string": "beta", "new_string": "gamma"}),
        Turn.tool("Bash", {"command": "mkdir -p src && echo 'print(1)' > src/main.py", "description": "add src"}),
        Turn.text("Done: wrote hello.txt, edited notes.txt, added src/main.py."),
    ]
    with ScriptedAPI({"job-one": script}) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="grep -q 'hello world' hello.txt && grep -q gamma notes.txt")
        runner = run_executor(world.settings())
        job_id = world.submit(id="job-one", workspace=str(repo), prompt="job-one: write, edit and add")
        store = runner.executor.store
        job = wait_status(store, job_id, {Status.succeeded, Status.rolled_back, Status.failed})
        assert job.status == Status.succeeded, (job.reason, job.error)
        offered = {tool["name"] for tool in api.conversation[0].body["tools"]}
    # the policy's disallowed_tools never reach the model; the tools a coding job needs do
    assert {"Bash", "Read", "Edit", "Write"} <= offered and not offered & {"Agent", "WebFetch", "Workflow"}

    assert (repo / "hello.txt").read_text() == "hello world\n"
    assert (repo / "notes.txt").read_text() == "alpha\ngamma\n"
    assert (repo / "src" / "main.py").read_text() == "print(1)\n"
    assert (repo / "hello.txt").stat().st_uid == 1000
    assert sorted(job.changed_files) == ["hello.txt", "notes.txt", "src", "src/main.py"] or \
        {"hello.txt", "notes.txt", "src/main.py"} <= set(job.changed_files)
    assert job.models_seen == ["claude-sonnet-4-5"]
    assert job.test_exit_code == 0
    kinds = [e.kind for e in store.events(job_id=job_id)]
    for kind in ("init", "tool_call", "tool_result", "turn", "result", "tests", "state"):
        assert kind in kinds, kind
    calls = [e.data for e in store.events(job_id=job_id) if e.kind == "tool_call"]
    assert {"name": "Write", "file_path": "/workspace/hello.txt"}.items() <= calls[0].items()
    assert any(c.get("command", "").startswith("mkdir -p src") for c in calls)
    # the spool file was accepted, nothing left in incoming
    assert not list((world.home / "spool" / "incoming").iterdir())
    assert len(list((world.home / "spool" / "accepted").iterdir())) == 1
    # the job directory (upper dir) is gone after the commit
    assert not (world.home / "jobs" / job_id).exists()


# --------------------------------------------------------------------------------------------- helpers

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled}


def run_one(world, run_executor, key: str, script: list, repo: Path, test_command: str = "true"):
    """Run one job (prompt containing ``key``) to a settled status; returns (job, store, api)."""
    with ScriptedAPI({key: script}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        # the job file carries the test command (JSON-escaped; the policy's TOML helper does not escape)
        job_id = world.submit(id=key, workspace=str(repo), prompt=f"{key}: do it", test_command=test_command)
        store = runner.executor.store
        job = wait_status(store, job_id, SETTLED)
    return job, store, api


def tree(root: Path) -> dict[str, str]:
    """Every entry below root: relative path -> 'dir' | 'link:TARGET' | file content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_text()
    return out


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


def tool_results(store, job_id: str) -> list[dict]:
    return [e.data for e in store.events(job_id=job_id) if e.kind == "tool_result"]


def agent_end(store, job_id: str) -> dict:
    return [e.data for e in store.events(job_id=job_id) if e.kind == "agent_end"][-1]


def container_creations(docker_client, since: float, **labels: str) -> list[str]:
    """Names of executor containers the engine created since ``since`` (epoch seconds)."""
    filters = {"type": "container", "event": "create", "label": ["io.executor=1"] +
               [f"{k}={v}" for k, v in labels.items()]}
    events = docker_client.events(since=int(since) - 1, until=int(time.time()) + 1, decode=True, filters=filters)
    # the engine's since is whole seconds: keep only what happened at or after ``since`` itself
    return [e.get("Actor", {}).get("Attributes", {}).get("name", "?") for e in events
            if e.get("timeNano", 0) >= int(since * 1e9)]


# ------------------------------------------------------------------------------------------ test gate


def test_failing_tests_roll_back_and_record_the_output(world, run_executor):
    repo = world.repo("tf", {"notes.txt": "alpha\n", "src/a.py": "a = 1\n"})
    before = tree_digest(repo)
    script = [
        Turn.tool("Write", {"file_path": "/workspace/new.txt", "content": "new\n"}),
        bash("rm src/a.py && echo changed >> notes.txt"),
        Turn.text("Done."),
    ]
    job, store, _ = run_one(world, run_executor, "job-testfail", script, repo,
                            test_command="test -f new.txt && echo MARKER-tests-ran-on-the-change && exit 3")
    assert job.status == Status.rolled_back, (job.reason, job.error)
    assert job.reason == "tests_failed"
    assert job.test_exit_code == 3
    assert "MARKER-tests-ran-on-the-change" in job.test_output
    assert tree_digest(repo) == before
    assert not (world.home / "jobs" / job.id).exists()
    tests = [e.data for e in store.events(job_id=job.id) if e.kind == "tests"]
    assert tests and tests[-1]["exit_code"] == 3


# ------------------------------------------------------------------------------ deletions and opaque dirs


def test_deleted_file_and_replaced_directory_are_committed(world, run_executor):
    repo = world.repo("del", {"old.txt": "old\n", "keep.txt": "keep\n", "lib/a.py": "a\n",
                              "lib/sub/b.py": "b\n"})
    script = [bash("rm old.txt && rm -rf lib && mkdir lib && echo new > lib/new.py"), Turn.text("Done.")]
    job, store, _ = run_one(world, run_executor, "job-del", script, repo,
                            test_command="test ! -e old.txt && test ! -e lib/a.py && test ! -e lib/sub "
                                         "&& test -f lib/new.py")
    assert job.status == Status.succeeded, (job.reason, job.error, agent_end(store, job.id))
    assert tree(repo) == {"keep.txt": "keep\n", "lib": "dir", "lib/new.py": "new\n"}
    assert {"old.txt", "lib", "lib/new.py"} <= set(job.changed_files)
    assert (repo / "lib" / "new.py").stat().st_uid == 1000
    assert (repo / "lib").stat().st_uid == 1000


def test_empty_repository_dir_created_removed_and_recreated(world, run_executor):
    repo = world.repo("empty")
    assert not any(repo.iterdir())
    script = [
        bash("mkdir -p d/e && echo 1 > d/e/f.txt && echo 2 > top.txt && echo x > d/x.txt"),
        bash("rm -rf d && mkdir d && echo 3 > d/g.txt"),
        Turn.text("Done."),
    ]
    job, store, _ = run_one(world, run_executor, "job-empty", script, repo)
    assert job.status == Status.succeeded, (job.reason, job.error, agent_end(store, job.id))
    assert tree(repo) == {"top.txt": "2\n", "d": "dir", "d/g.txt": "3\n"}
    for rel in ("top.txt", "d", "d/g.txt"):
        assert (repo / rel).lstat().st_uid == 1000, rel


# ------------------------------------------------------------------------------------- escape attempts


def test_escape_attempts_are_contained(world, run_executor):
    assert not Path("/etc/pwned-by-agent").exists()
    repo = world.repo("esc", {"hello.txt": "hi\n"}, git=True)
    git_before = tree_digest(repo / ".git")
    script = [
        bash("ln -s /etc etc_link"),
        bash("echo pwned > etc_link/pwned-by-agent"),
        bash("printf '[core]\\n\\thooksPath = /tmp/evil\\n' >> .git/config"),
        bash("mkdir -p .git/hooks && printf '#!/bin/sh\\ntouch /tmp/hooked\\n' > .git/hooks/post-checkout "
             "&& chmod +x .git/hooks/post-checkout"),
        bash("touch s && chmod 4755 s"),
        Turn.text("Done."),
    ]
    # the tests see the change as it would be committed: the link, the setuid bit, the .git writes
    job, store, _ = run_one(world, run_executor, "job-escape", script, repo,
                            test_command="test -L etc_link && test -u s && grep -q hooksPath .git/config "
                                         "&& test -x .git/hooks/post-checkout")
    assert job.status == Status.succeeded, (job.reason, job.error, agent_end(store, job.id))
    results = tool_results(store, job.id)
    assert len(results) == 5
    assert results[1].get("is_error"), results[1]  # the write through the link failed in the container

    assert not Path("/etc/pwned-by-agent").exists()
    assert tree_digest(repo / ".git") == git_before
    committing = [e.data for e in store.events(job_id=job.id) if e.kind == "state"
                  and e.data.get("status") == "committing"]
    assert {".git/config", ".git/hooks/post-checkout"} <= set(committing[0]["ignored_git"])
    assert not any(p == ".git" or p.startswith(".git/") for p in job.changed_files)
    link = repo / "etc_link"
    assert link.is_symlink() and os.readlink(link) == "/etc"
    assert stat.S_ISLNK(link.lstat().st_mode)
    s = (repo / "s").lstat()
    assert stat.S_ISREG(s.st_mode)
    assert s.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, oct(s.st_mode)
    assert (repo / "hello.txt").read_text() == "hi\n"


def test_write_through_existing_outside_symlink_stays_in_container(world, run_executor, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    chown_tree(outside)
    outside_before = tree_digest(outside)
    repo = world.repo("sym", {"hello.txt": "hi\n"})
    os.symlink(str(outside), repo / "out")
    os.lchown(repo / "out", 1000, 1000)
    # In the container the link resolves in the container's own filesystem: make the target exist
    # there (/tmp is a writable tmpfs) so the write really happens, then read it back.
    script = [
        bash(f"mkdir -p {outside} ; echo pwned > out/x.txt ; echo pwned > out/keep.txt ; cat out/x.txt"),
        Turn.text("Done."),
    ]
    job, store, _ = run_one(world, run_executor, "job-symout", script, repo)
    assert job.status in SETTLED
    results = tool_results(store, job.id)
    assert len(results) == 1, results
    if str(outside).startswith("/tmp/"):
        # the link was followed in the container, into its own /tmp tmpfs: the write did happen there
        assert "pwned" in results[0]["content"], results[0]
    assert tree_digest(outside) == outside_before
    assert not (outside / "x.txt").exists()
    assert (outside / "keep.txt").read_text() == "keep\n"
    assert (repo / "out").is_symlink() and os.readlink(repo / "out") == str(outside)


# ------------------------------------------------------------------------------- what the tests write


def test_files_written_by_the_tests_are_not_committed(world, run_executor):
    repo = world.repo("cache", {"hello.txt": "hi\n"})
    script = [bash("echo agent > hello.txt"), Turn.text("Done.")]
    job, store, _ = run_one(
        world, run_executor, "job-cache", script, repo,
        test_command="mkdir -p .cache && echo x > .cache/c && python3 -c \"import pathlib; "
                     "pathlib.Path('__pycache__').mkdir(exist_ok=True); "
                     "pathlib.Path('__pycache__/m.pyc').write_text('c')\" && ls -a && true")
    assert job.status == Status.succeeded, (job.reason, job.error, agent_end(store, job.id))
    assert job.test_exit_code == 0
    assert ".cache" in job.test_output and "__pycache__" in job.test_output  # they were made in the view
    assert not (repo / ".cache").exists()
    assert not (repo / "__pycache__").exists()
    assert tree(repo) == {"hello.txt": "agent\n"}
    assert job.changed_files == ["hello.txt"]


def test_tests_cannot_tamper_with_the_committed_change(world, run_executor):
    repo = world.repo("tamper", {"hello.txt": "hi\n"})
    script = [bash("echo agent > hello.txt"), Turn.text("Done.")]
    job, store, _ = run_one(world, run_executor, "job-tamper", script, repo,
                            test_command="echo tampered > hello.txt; cat hello.txt; true")
    assert job.status == Status.succeeded, (job.reason, job.error, agent_end(store, job.id))
    assert "tampered" in job.test_output  # the write did happen, in the throwaway test layer
    assert (repo / "hello.txt").read_text() == "agent\n"


# ------------------------------------------------------------------------------------- bad job files


def _rejections(rejected: Path) -> dict[str, str]:
    """Rejected job file name -> the error its NAME.error.json gives."""
    out = {}
    for p in rejected.iterdir():
        if p.name.endswith(".error.json"):
            name = p.name[: -len(".error.json")]
            report = json.loads(p.read_text())
            assert report["file"] == name
            out[name] = report["error"]
    return out


def test_bad_job_files_are_rejected_with_a_reason(world, run_executor, docker_client):
    token = f"bad{os.getpid()}x{time.time_ns() % 10**9}"
    repo = world.repo("target", {"hello.txt": "hi\n"})
    repo_before = tree_digest(repo)
    elsewhere = world.root / "elsewhere"
    elsewhere.mkdir()
    chown_tree(elsewhere)

    def job(n: str, **over) -> bytes:
        body = {"id": f"{token}-{n}", "runner": "scripted", "workspace": str(repo), "prompt": f"{token} {n}"}
        body.update(over)
        return json.dumps(body).encode()

    # a valid job file outside the spool: were the symlink followed, it would be accepted
    linked = world.root / "linked-job.json"
    linked.write_bytes(job("via-link"))
    big = job("big", prompt="x" * (1024 * 1024))
    assert len(big) > 1024 * 1024
    bad = {
        "a-malformed.json": (b'{"runner": "scripted", "workspace": ', ["json"]),
        "b-runner.json": (job("runner", runner="nope"), ["unknown runner", "nope"]),
        "c-outside.json": (job("outside", workspace=str(elsewhere)), ["not under a workspace root"]),
        "d-field.json": (job("field", colour="red"), ["unknown field", "colour"]),
        "e-big.json": (big, ["1 mib"]),
        # 200,000 nested brackets under 1 MiB, in incoming/ when the executor starts: it must start and serve
        "g-nested.json": (b"[" * 200_000 + b"]" * 200_000, ["recursion"]),
    }
    started = time.time()
    with ScriptedAPI({token: [Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        spool = Spool(world.home / "spool")
        for name, (content, _) in bad.items():
            spool.write(content, name=name)
        os.symlink(linked, spool.incoming / "f-link.json")
        runner = run_executor(world.settings())
        store = runner.executor.store
        wait_for(lambda: len(list(spool.rejected.iterdir())) == 2 * (len(bad) + 1), 30, "all files rejected")
        for _ in range(3):  # a few more ticks: nothing may start later either
            ticked = runner.executor.last_tick
            wait_for(lambda: runner.executor.last_tick > ticked, 30, "a tick of the loop")
        assert api.requests == []

    errors = _rejections(spool.rejected)
    assert set(errors) == set(bad) | {"f-link.json"}
    for name, (_, words) in bad.items():
        for word in words:
            assert word in errors[name].lower(), (name, errors[name])
    assert "symlink" in errors["f-link.json"]
    assert (spool.rejected / "f-link.json").is_symlink()  # the link itself was moved, never followed
    assert linked.read_bytes() == job("via-link")
    assert (spool.rejected / "e-big.json").stat().st_size == len(big)  # rejected files are kept whole
    assert not list(spool.incoming.iterdir()) and not list(spool.accepted.iterdir())
    # The refused files that named an id are job records, rejected with their reason; none ever ran.
    records = {j.id: j for j in store.jobs()}
    assert set(records) == {f"{token}-runner", f"{token}-outside", f"{token}-field"}
    assert all(j.status == Status.rejected and j.attempts == 0 and j.error for j in records.values())
    assert not (world.home / "jobs").exists() or not any((world.home / "jobs").iterdir())
    created = [n for n in container_creations(docker_client, started) if token in n]
    assert created == []
    assert tree_digest(repo) == repo_before


def test_duplicate_job_id_is_rejected(world, run_executor, docker_client):
    repo = world.repo("dup", {"hello.txt": "hi\n"})
    other = world.repo("dup-other", {"hello.txt": "hi\n"})
    other_before = tree_digest(other)
    script = {"dup-original": [bash("echo original > hello.txt"), Turn.text("Done.")],
              "dup-second": [bash("echo second > hello.txt"), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        spool = Spool(world.home / "spool")
        t0 = time.time()
        world.submit(id="dup-job", workspace=str(repo), prompt="dup-original: go")
        first = wait_status(store, "dup-job", SETTLED)
        assert first.status == Status.succeeded, (first.reason, first.error)
        # positive control for the engine query used below: the original's containers are seen
        own = f"executor-{runner.executor.sandbox.instance}-dup-job-a1"
        assert {f"{own}-agent", f"{own}-tests"} <= \
            set(container_creations(docker_client, t0, **{"io.executor.job": "dup-job"}))
        requests_before = len(api.requests)
        since = time.time()
        spool.write(json.dumps({"id": "dup-job", "runner": "scripted", "workspace": str(other),
                                "prompt": "dup-second: go"}).encode(), name="dup-second.json")
        wait_for(lambda: (spool.rejected / "dup-second.json.error.json").exists(), 30, "the duplicate rejected")
        ticked = runner.executor.last_tick
        # Two more ticks of intake and admission: had the duplicate been taken, it would have started.
        wait_for(lambda: runner.executor.last_tick > ticked, 30, "a tick after the rejection")
        ticked = runner.executor.last_tick
        wait_for(lambda: runner.executor.last_tick > ticked, 30, "a second tick after the rejection")
        assert len(api.requests) == requests_before
        assert not any("dup-second" in r.first_user_text for r in api.requests)

    error = json.loads((spool.rejected / "dup-second.json.error.json").read_text())["error"]
    assert "already exists" in error and "dup-job" in error
    assert (spool.rejected / "dup-second.json").exists()
    jobs = store.jobs()
    assert [j.id for j in jobs] == ["dup-job"]
    assert jobs[0].prompt == "dup-original: go" and jobs[0].workspace == str(repo)
    assert jobs[0].status == Status.succeeded and jobs[0].attempts == 1
    assert (repo / "hello.txt").read_text() == "original\n"
    assert tree_digest(other) == other_before
    assert container_creations(docker_client, since, **{"io.executor.job": "dup-job"}) == []


# ------------------------------------------------------------------------------------------- cancel


def test_cancel_of_a_running_job_rolls_back(world, run_executor, docker_client):
    repo = world.repo("cancel", {"hello.txt": "hi\n", "src/a.py": "a\n"})
    before = tree_digest(repo)
    script = [Turn.tool("Bash", {"command": "echo partial > partial.txt", "description": "x"}), Turn.hang()]
    with ScriptedAPI({"job-cancel": script}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        job_id = world.submit(id="job-cancel", workspace=str(repo), prompt="job-cancel: work then hang")
        wait_status(store, job_id, Status.running, timeout=60)

        def bash_done():
            kinds = [(e.kind, e.data.get("name")) for e in store.events(job_id=job_id)]
            return ("tool_call", "Bash") in kinds and any(k == "tool_result" for k, _ in kinds)

        wait_for(bash_done, 60, "the Bash tool call and its result")
        wait_for(lambda: len(api.conversation) >= 2, 30, "the hanging request")
        # the agent's write is in the job's upper dir (the transaction), not in the repository
        upper = world.settings().job_dir(job_id) / "layers" / "upper"
        assert (upper / "partial.txt").read_text() == "partial\n"
        assert not (repo / "partial.txt").exists()
        live = docker_client.containers.list(filters={"label": f"io.executor.job={job_id}"})
        assert live, "the agent container should be running while the API hangs"
        assert store.get(job_id).status == Status.running

        cli = subprocess.run([str(Path(sys.executable).parent / "executor"), "cancel", job_id],
                             env=world.env(), capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "cancel requested" in cli.stdout
        job = wait_status(store, job_id, SETTLED, timeout=60)

    assert job.status == Status.cancelled, (job.reason, job.error)
    assert job.reason == "cancelled"
    assert docker_client.containers.list(all=True, filters={"label": f"io.executor.job={job_id}"}) == []
    assert docker_client.volumes.list(filters={"label": f"io.executor.job={job_id}"}) == []
    assert tree_digest(repo) == before
    assert not (repo / "partial.txt").exists()
    assert not world.settings().job_dir(job_id).exists()
    assert job.test_exit_code is None  # no test run for a cancelled agent
