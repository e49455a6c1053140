"""End to end through the spool: the real engine, the real sandbox image, the real Claude Code CLI,
a scripted Messages API on loopback, a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from executor.spool import Spool
from executor.store import Status
from tests.conftest import tree_digest, wait_status
from tests.scripted_api import ScriptedAPI, Turn


def submit(world, **job) -> str:
    job.setdefault("runner", "scripted")
    Spool(world.home / "spool").write(json.dumps(job).encode())
    return job["id"]


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
        job_id = submit(world, id="job-one", workspace=str(repo), prompt="job-one: write, edit and add")
        store = runner.executor.store
        job = wait_status(store, job_id, {Status.succeeded, Status.rolled_back, Status.failed})
        assert job.status == Status.succeeded, (job.reason, job.error)

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
