"""Review end to end: real jobs (the real engine, sandbox image and Claude Code CLI against a scripted
Messages API) that stop in ``awaiting_review`` after their tests passed, and the ``executor review`` command
(a separate process, as a person runs it) approving, partially approving or rejecting them, also across a
restart of the executor and after the repository changed under them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from executor.intake.spool import Spool
from executor.settings import COMPACTION_MODEL
from executor.store import Status
from executor.transaction.retention import remove_expired
from tests.conftest import assert_no_disk_leftovers, release_disks, tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.awaiting_review}
#: What the tests saw: every file of the tested tree (without .git) and its hash, printed by the test command.
DIGEST = "find . -path ./.git -prune -o -type f -print | LC_ALL=C sort | xargs -r sha256sum"


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


def submit(world, job_id: str, repo: Path, policy: str = "default", test_command: str = "true") -> str:
    Spool(world.home / "spool").write(json.dumps({
        "id": job_id, "runner": "scripted", "workspace": str(repo), "prompt": f"{job_id}: do it",
        "policy": policy, "test_command": test_command}).encode())
    return job_id


def cli(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXECUTOR, *args], env=world.env(), capture_output=True, text=True, timeout=120)


def files_digest(root: Path) -> str:
    """``DIGEST``'s output for ``root`` as the host sees it."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) == root and d == ".git")]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            rel = "./" + str(path.relative_to(root))
            lines.append((rel, hashlib.sha256(path.read_bytes()).hexdigest()))
    return "".join(f"{h}  {rel}\n" for rel, h in sorted(lines))


def no_job_objects(docker_client, job_id: str) -> bool:
    label = {"label": f"io.executor.job={job_id}"}
    return not docker_client.containers.list(all=True, filters=label) and not docker_client.volumes.list(filters=label)


# ------------------------------------------------------------------------------------------- triggers


def test_each_trigger_puts_the_job_in_review_and_never_commits_directly(world, run_executor, docker_client):
    world.write_policy("paths", review_paths=["migrations/**", "Dockerfile"])
    world.write_policy("lines", review_max_changed_lines=5)
    world.write_policy("always", review="always")
    world.write_policy("never", review="never")
    base = {"src/app.py": "x = 1\n", "tests/test_app.sh": "test -f src/app.py\n"}
    cases = {
        # job id: (policy, script, expected trigger or None for a direct commit)
        "rv-paths": ("paths", [bash("mkdir -p migrations && echo 'ALTER TABLE t;' > migrations/0002.sql"),
                               Turn.text("Added the migration.")], "review_paths"),
        "rv-protected": ("default", [bash("echo 'true' > tests/test_app.sh"), Turn.text("Made the test pass.")],
                         "protected_paths"),
        "rv-lines": ("lines", [bash("seq 1 20 > src/numbers.txt"), Turn.text("Wrote the numbers.")],
                     "changed_lines"),
        "rv-model": ("default", [bash("echo 'x = 2' > src/app.py"),
                                 Turn.text("Changed x.\nREVIEW: unsure whether x may change")], "model"),
        "rv-always": ("always", [bash("echo 'x = 3' > src/app.py"), Turn.text("Changed x.")], "always"),
        "rv-never": ("never", [bash("echo 'true' > tests/test_app.sh && echo 'x = 4' > src/app.py"),
                               Turn.text("Done.\nREVIEW: please look")], None),
        "rv-clean": ("default", [bash("echo 'x = 5' > src/app.py"), Turn.text("Done.")], None),
    }
    repos = {job_id: world.repo(job_id, base) for job_id in cases}
    before = {job_id: tree_digest(repo) for job_id, repo in repos.items()}
    with ScriptedAPI({job_id: script for job_id, (_, script, _) in cases.items()}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        for job_id, (policy, _, _) in cases.items():
            submit(world, job_id, repos[job_id], policy)
        jobs = {job_id: wait_status(store, job_id, SETTLED, timeout=180) for job_id in cases}
        systems = {r.key: json.dumps(r.body.get("system")) for r in api.conversation}

    for job_id, (policy, _, trigger) in cases.items():
        job = jobs[job_id]
        if trigger is None:
            assert job.status == Status.succeeded, (job_id, job.reason, job.error)
            assert not (world.home / "jobs" / job_id).exists()
            continue
        assert job.status == Status.awaiting_review, (job_id, job.status, job.reason, job.error)
        assert [r["trigger"] for r in job.review_reasons] == [trigger], (job_id, job.review_reasons)
        assert job.reason == "review" and job.review_since is not None and job.test_exit_code == 0
        assert tree_digest(repos[job_id]) == before[job_id], job_id  # nothing applied yet
        assert (world.home / "jobs" / job_id / "layers" / "upper").is_dir()  # the change is kept ...
        assert no_job_objects(docker_client, job_id)  # ... but no overlay volume or container holds it
        events = [e.data for e in store.events(job_id=job_id) if e.kind == "review"]
        assert events and events[0]["action"] == "awaiting"
    assert "migrations/0002.sql" in jobs["rv-paths"].review_reasons[0]["message"]
    assert "tests/test_app.sh" in jobs["rv-protected"].review_reasons[0]["message"]
    assert jobs["rv-lines"].review_reasons[0]["lines"] == 20
    assert "unsure whether x may change" in jobs["rv-model"].review_reasons[0]["message"]
    assert (repos["rv-never"] / "src/app.py").read_text() == "x = 4\n"
    assert (repos["rv-never"] / "tests/test_app.sh").read_text() == "true\n"
    assert (repos["rv-clean"] / "src/app.py").read_text() == "x = 5\n"
    # the model is told how to ask for a review, unless the policy never reviews
    assert "REVIEW: <" in systems["rv-clean"] and "REVIEW: <" not in systems.get("rv-never", "")

    listed = cli(world, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == {j for j, c in cases.items() if c[2]}


# ---------------------------------------------------------------------------------- approve and reject


def test_approve_commits_exactly_the_tested_tree_and_reject_leaves_the_repository(world, run_executor):
    world.write_policy("always", review="always")
    files = {"keep.txt": "keep\n", "edit.py": "def f():\n    return 1\n", "old.txt": "old\n", "lib/a.py": "a\n"}
    repo = world.repo("rv-approve", files)
    other = world.repo("rv-reject", files)
    other_before = tree_digest(other)
    change = [bash("sed -i 's/return 1/return 2/' edit.py && rm old.txt && mkdir -p new && "
                   "printf 'fresh\\n' > new/file.txt && printf '\\x00\\x01bin' > blob.bin"),
              Turn.text("Edited edit.py, removed old.txt, added new/file.txt and blob.bin.")]
    with ScriptedAPI({"rv-approve": change, "rv-reject": change}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        submit(world, "rv-approve", repo, "always", test_command=DIGEST)
        submit(world, "rv-reject", other, "always", test_command=DIGEST)
        for job_id in ("rv-approve", "rv-reject"):
            job = wait_status(store, job_id, SETTLED, timeout=180)
            assert job.status == Status.awaiting_review, (job.reason, job.error)

        shown = cli(world, "review", "show", "rv-approve")
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        assert "the policy reviews every change" in out  # the reason
        assert "Edited edit.py, removed old.txt" in out  # the agent's final message
        assert DIGEST in out and "./new/file.txt" in out  # the test command and its output
        assert "--- a/edit.py\n+++ b/edit.py\n" in out and "-    return 1\n" in out and "+    return 2\n" in out
        assert "=== old.txt: deleted" in out and "-old\n" in out
        assert "+++ b/new/file.txt" in out and "+fresh\n" in out
        assert "=== blob.bin: binary file added" in out

        tested = store.get("rv-approve").test_output
        approved = cli(world, "review", "approve", "rv-approve", "--note", "fine by me")
        assert approved.returncode == 0, approved.stderr
        rejected = cli(world, "review", "reject", "rv-reject", "--note", "not like this")
        assert rejected.returncode == 0, rejected.stderr

        job = store.get("rv-approve")
        assert job.status == Status.succeeded and job.reason == "committed"
        assert files_digest(repo) == tested  # the repository now is the tree the tests passed
        assert (repo / "edit.py").read_text() == "def f():\n    return 2\n" and not (repo / "old.txt").exists()
        assert (repo / "new/file.txt").stat().st_uid == 1000
        assert not (world.home / "jobs" / "rv-approve").exists()
        [decision] = [e.data for e in store.events(job_id="rv-approve") if e.kind == "review" and e.data["action"] == "approve"]
        assert decision["note"] == "fine by me" and decision["by"] and decision["at"]

        job = store.get("rv-reject")
        assert job.status == Status.rolled_back and job.reason == "rejected" and job.review_note == "not like this"
        assert tree_digest(other) == other_before  # byte-identical
        assert not (world.home / "jobs" / "rv-reject").exists()
        [decision] = [e.data for e in store.events(job_id="rv-reject") if e.kind == "review" and e.data["action"] == "reject"]
        assert decision["note"] == "not like this" and decision["by"]


def test_approve_after_the_repository_changed_applies_nothing_and_names_the_paths(world, run_executor):
    world.write_policy("always", review="always")
    world.write_policy("never", review="never")
    repo = world.repo("rv-conflict", {"shared.txt": "base\n", "mine.txt": "mine\n", "person.txt": "p\n"})
    script = {
        "rv-conflict": [bash("echo job > shared.txt && echo job > mine.txt && echo job > person.txt"), Turn.text("Done.")],
        "rv-later": [bash("echo later > shared.txt"), Turn.text("Done.")],
    }
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        submit(world, "rv-conflict", repo, "always")
        assert wait_status(store, "rv-conflict", SETTLED).status == Status.awaiting_review
        # the workspace is free while the job waits: another job on it runs and commits
        submit(world, "rv-later", repo, "never")
        later = wait_status(store, "rv-later", SETTLED)
        assert later.status == Status.succeeded, (later.reason, later.error)
        (repo / "person.txt").write_text("a person's edit\n")
        before = tree_digest(repo)

        approved = cli(world, "review", "approve", "rv-conflict")
        assert approved.returncode != 0
        assert "shared.txt" in approved.stderr and "person.txt" in approved.stderr
        assert "mine.txt" not in approved.stderr.split("since the job started:")[1]
        assert tree_digest(repo) == before  # nothing applied, not even mine.txt
        job = store.get("rv-conflict")
        assert job.status == Status.failed and job.reason == "conflict"
        assert "shared.txt" in job.error and "person.txt" in job.error
        assert (world.home / "jobs" / "rv-conflict" / "layers" / "upper").is_dir()  # kept for inspection


def test_partial_approve_applies_only_the_chosen_files(world, run_executor):
    world.write_policy("always", review="always")
    repo = world.repo("rv-part", {"a.txt": "a\n", "b.txt": "b\n", "c.txt": "c\n"})
    script = [bash("echo A > a.txt && echo B > b.txt && rm c.txt && mkdir d && echo D > d/new.txt"), Turn.text("Done.")]
    with ScriptedAPI({"rv-part": script}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        submit(world, "rv-part", repo, "always")
        assert wait_status(store, "rv-part", SETTLED).status == Status.awaiting_review
        bad = cli(world, "review", "approve", "rv-part", "--files", "nope.txt")
        assert bad.returncode != 0 and "not changed by the job: nope.txt" in bad.stderr
        assert store.get("rv-part").status == Status.awaiting_review
        approved = cli(world, "review", "approve", "rv-part", "--files", "b.txt", "d/new.txt")
        assert approved.returncode == 0, approved.stderr
    job = store.get("rv-part")
    assert job.status == Status.succeeded and job.review_files == ["b.txt", "d/new.txt"]
    assert sorted(job.changed_files) == ["b.txt", "d/new.txt"]
    assert (repo / "a.txt").read_text() == "a\n" and (repo / "c.txt").read_text() == "c\n"
    assert (repo / "b.txt").read_text() == "B\n" and (repo / "d/new.txt").read_text() == "D\n"


# ---------------------------------------------------------------------------------- request changes


def test_request_changes_queues_a_follow_up_that_revises_the_kept_change(world, run_executor):
    """The reviewer's note becomes the prompt of a follow-up job of the same session, which starts on the
    reviewed job's kept change (edits, a deletion, a new directory) and is reviewed again as a whole."""
    world.write_policy("always", review="always")
    repo = world.repo("rv-rc", {"edit.py": "def f():\n    return 1\n", "old.txt": "old\n"})
    first = [bash("sed -i 's/return 1/return 2/' edit.py && rm old.txt && mkdir new && echo fresh > new/file.txt "
                  "&& touch ~/rv-rc-home"),
             Turn.text("Changed f, removed old.txt, added new/file.txt.")]
    # The follow-up checks it stands on the kept change before adding to it: a clean repository would fail.
    revise = [bash("grep -q 'return 2' edit.py && test ! -e old.txt && test -f new/file.txt && echo note > NOTE.md"),
              Turn.text("Added NOTE.md on top of the earlier change.")]
    # The follow-up's session brief is written by the small model, whose request also names the note.
    with ScriptedAPI({"rc-note": revise, "rv-rc": first}, models={COMPACTION_MODEL: Turn.text("summary")}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        store = runner.executor.store
        submit(world, "rv-rc", repo, "always")
        reviewed = wait_status(store, "rv-rc", SETTLED, timeout=180)
        assert reviewed.status == Status.awaiting_review, (reviewed.reason, reviewed.error)

        empty = cli(world, "review", "request-changes", "rv-rc", "--note", "   ")
        assert empty.returncode == 1 and "say what should change" in empty.stderr
        asked = cli(world, "review", "request-changes", "rv-rc", "--note", "rc-note: also add NOTE.md", "--json")
        assert asked.returncode == 0, asked.stderr
        answer = json.loads(asked.stdout)
        follow_id = answer["follow_up"]
        assert answer["status"] == "rolled_back" and answer["reason"] == "changes_requested"

        base = store.get("rv-rc")
        assert base.review_note == "rc-note: also add NOTE.md" and follow_id in base.error
        follow = store.get(follow_id)
        assert follow.prompt == "rc-note: also add NOTE.md" and follow.session_id == base.session_id
        assert follow.builds_on == "rv-rc" and follow.follows == "rv-rc" and follow.start_ns == base.start_ns
        assert (repo / "edit.py").read_text() == "def f():\n    return 1\n" and (repo / "old.txt").exists()

        # the decided diff is kept and shown once the change has moved on
        shown = cli(world, "review", "show", "rv-rc")
        assert shown.returncode == 0, shown.stderr
        assert "changes_requested" in shown.stdout and "-    return 1" in shown.stdout and "+    return 2" in shown.stdout

        again = wait_status(store, follow_id, SETTLED, timeout=180)
        assert again.status == Status.awaiting_review, (again.reason, again.error)
        asked_of_agent = [r.first_user_text for r in api.conversation
                          if "rc-note" in r.first_user_text and r.body.get("tools")]
        assert asked_of_agent and "has not been applied" in asked_of_agent[0] and "rv-rc: do it" in asked_of_agent[0]
        assert not (world.home / "jobs" / "rv-rc" / "layers" / "upper").exists()  # the change moved to the follow-up
        # ... as the reviewed job's disk image, handed over whole: renamed, mounted at the follow-up's layers
        assert not (world.home / "jobs" / "rv-rc" / "layers.img").exists()
        assert (world.home / "jobs" / follow_id / "layers.img").is_file()
        assert os.path.ismount(world.home / "jobs" / follow_id / "layers")
        assert not (world.home / "jobs" / follow_id / "layers" / "home" / "upper" / "rv-rc-home").exists()

        approved = cli(world, "review", "approve", follow_id)
        assert approved.returncode == 0, approved.stderr
    assert (repo / "edit.py").read_text() == "def f():\n    return 2\n" and not (repo / "old.txt").exists()
    assert (repo / "new/file.txt").read_text() == "fresh\n" and (repo / "NOTE.md").read_text() == "note\n"
    assert store.get(follow_id).status == Status.succeeded
    shown = json.loads(cli(world, "show", "rv-rc", "--json").stdout)
    assert shown["followed_by"] == [follow_id]
    remove_expired(world.settings(), store)  # the reviewed job's emptied directory goes too
    assert_no_disk_leftovers(world.home)  # the handed-over image went with the follow-up's commit


# -------------------------------------------------------------------------------------------- restart


def test_a_job_awaiting_review_survives_a_restart(world, run_executor, docker_client):
    world.write_policy("always", review="always")
    repo = world.repo("rv-restart", {"hello.txt": "hi\n"})
    with ScriptedAPI({"rv-restart": [bash("echo changed > hello.txt"), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        first = run_executor(world.settings())
        submit(world, "rv-restart", repo, "always")
        assert wait_status(first.executor.store, "rv-restart", SETTLED).status == Status.awaiting_review
        first.close()
        layers = world.home / "jobs" / "rv-restart" / "layers"
        assert os.path.ismount(layers)  # the kept change stays mounted while the executor is down ...
        release_disks(world.home)  # ... until the machine reboots: the image is there, nothing mounts it
        assert_no_disk_leftovers(world.home)
        assert not (layers / "upper").exists()
        shown = cli(world, "review", "show", "rv-restart")  # a person looks before the executor is back
        assert shown.returncode == 0 and "+changed" in shown.stdout, shown.stdout + shown.stderr
        assert os.path.ismount(layers)  # the command mounted the image again to read the change
        release_disks(world.home)  # and the recovery of the restarted executor does it as well

        second = run_executor(world.settings())
        store = second.executor.store
        wait_for(lambda: second.executor.last_tick, 60, "the restarted executor's recovery")
        remove_expired(second.executor.settings, store)  # retention must not take a change that waits for a person
        assert store.get("rv-restart").status == Status.awaiting_review
        assert (world.home / "jobs" / "rv-restart" / "layers" / "upper" / "hello.txt").read_text() == "changed\n"
        assert (repo / "hello.txt").read_text() == "hi\n"
        assert no_job_objects(docker_client, "rv-restart")  # the sweep had nothing of it to remove
        approved = cli(world, "review", "approve", "rv-restart")  # while the executor serves
        assert approved.returncode == 0, approved.stderr
    assert store.get("rv-restart").status == Status.succeeded
    assert (repo / "hello.txt").read_text() == "changed\n"
    assert store.get("rv-restart").attempts == 1  # nothing ran again
    assert_no_disk_leftovers(world.home)  # committed: its image unmounted, its loop device released
