"""The executor killed with SIGKILL while jobs run: on restart nothing is lost and nothing runs twice (and an
adopted sealed job reaches its API again through sockets made anew at the same paths). The jobs' disk images
stay mounted through the crash (the adopted job keeps writing to its own), and once every job has settled
none is left mounted or bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from executor.clock import aware, utcnow
from executor.intake.spool import Spool
from executor.store import Status
from tests.conftest import assert_no_disk_leftovers, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")


def serve(world, log: Path) -> subprocess.Popen:
    return subprocess.Popen([EXECUTOR, "serve"], env=world.env(), stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"), start_new_session=True)


def test_sigkill_then_restart_adopts_running_jobs(world, docker_client, tmp_path):
    work = Turn.tool("Bash", {"command": "sleep 10; echo done > out.txt", "description": "slow work"})
    script = {"kill-a": [work, Turn.text("Done.")], "kill-b": [work, Turn.text("Done.")]}
    log = tmp_path / "serve.log"
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f out.txt", heartbeat_interval="1s", stall_after="60s")
        repos = {name: world.repo(name) for name in ("kill-a", "kill-b")}
        spool = Spool(world.home / "spool")
        for name, repo in repos.items():
            spool.write(json.dumps({"id": name, "runner": "scripted", "workspace": str(repo),
                                    "prompt": f"{name}: slow"}).encode())
        first = serve(world, log)
        try:
            wait_for(lambda: (world.home / "executor.db").exists(), 30, "the database")
            store = world.store()
            for name in repos:
                try:
                    wait_for(lambda n=name: any(e.kind == "tool_call" for e in store.events(job_id=n)), 90,
                             f"{name}'s tool call")
                except AssertionError as exc:
                    raise AssertionError(f"{exc}; jobs: {[(j.id, j.status.value, j.error) for j in store.jobs()]}; "
                                         f"serve log: {log.read_text()[-3000:]}") from None
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        # killed mid-attempt: the agent (or, on a slow machine, already its test gate) is still running
        assert {store.get(n).status for n in repos} <= {Status.running, Status.testing}
        assert all(os.path.ismount(world.home / "jobs" / n / "layers") for n in repos)  # mounts survive the kill
        # their containers outlived the executor
        assert len([c for c in docker_client.containers.list(filters={"label": "io.executor=1"})
                    if c.labels.get("io.executor.job") in repos]) >= 1

        restarted_at = utcnow()
        second = serve(world, log)
        try:
            for name in repos:
                job = wait_status(store, name, {Status.succeeded, Status.failed, Status.rolled_back, Status.queued},
                                  timeout=120)
                assert job.status == Status.succeeded, (job.reason, job.error, log.read_text()[-2000:])
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        requests = {name: [r for r in api.conversation if r.key == name] for name in repos}
    assert_no_disk_leftovers(world.home)  # both committed: their images unmounted, loop devices released

    for name, repo in repos.items():
        job = store.get(name)
        assert job.attempts == 1  # adopted, not started again
        events = store.events(job_id=name)
        assert any(e.kind == "adopted" for e in events)
        assert sum(1 for e in events if e.kind == "tool_call") == 1  # the stream was not recorded twice
        assert sum(1 for e in events if e.kind == "result") == 1
        assert len(requests[name]) == 2  # the agent's conversation ran once: one tool call, one answer
        assert (repo / "out.txt").read_text() == "done\n"
        # sealed: the adopted container's second call went through the job's sockets made again at the same path
        assert any(aware(row.ts) >= restarted_at and row.status == 200 for row in store.api_requests(job_id=name))


def test_sigkill_with_the_container_gone_requeues_from_clean(world, docker_client, tmp_path):
    script = {"gone": [Turn.tool("Bash", {"command": "echo half > half.txt; sleep 30", "description": "w"}),
                       Turn.text("Done.")]}
    log = tmp_path / "serve.log"
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="true")
        repo = world.repo("gone")
        Spool(world.home / "spool").write(json.dumps(
            {"id": "gone", "runner": "scripted", "workspace": str(repo), "prompt": "gone: work"}).encode())
        first = serve(world, log)
        try:
            wait_for(lambda: (world.home / "executor.db").exists(), 30, "the database")
            store = world.store()
            wait_for(lambda: any(e.kind == "tool_call" for e in store.events(job_id="gone")), 60, "the tool call")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        for c in docker_client.containers.list(all=True, filters={"label": "io.executor.job=gone"}):
            c.remove(force=True)  # the host lost the container too
        api.add("gone", [Turn.text("Done.")])  # the second attempt starts afresh and finishes at once
        second = serve(world, log)
        try:
            job = wait_status(store, "gone", {Status.succeeded, Status.failed, Status.rolled_back}, timeout=120)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
    assert job.status == Status.succeeded and job.attempts == 2
    assert not (repo / "half.txt").exists()  # the first attempt's partial work was rolled back
    assert_no_disk_leftovers(world.home)  # the interrupted attempt's image went with its rollback
    reasons = [e.data.get("reason") for e in store.events(job_id="gone") if e.kind == "state"]
    assert "interrupted" in reasons
