"""`executor session` and `executor status` as a person runs them, against a live executor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from executor.intake.spool import Spool
from executor.store import Status
from tests.conftest import wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")


def cli(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXECUTOR, *args], env=world.env(), capture_output=True, text=True, timeout=60)


def test_session_prints_the_arc_of_its_jobs(world, run_executor):
    script = {"arc-1": [Turn.tool("Write", {"file_path": "/workspace/one.txt", "content": "1\n"}), Turn.text("First done.")],
              "arc-2": [Turn.tool("Bash", {"command": "echo 2 > two.txt", "description": "w"}), Turn.text("Second done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        repo = world.repo("arc")
        running = run_executor(world.settings())
        spool = Spool(world.home / "spool")
        for n in (1, 2):
            spool.write(json.dumps({"id": f"arc-{n}", "session_id": "story", "runner": "scripted",
                                    "workspace": str(repo), "prompt": f"arc-{n}: step {n}"}).encode())
            wait_status(running.executor.store, f"arc-{n}", Status.succeeded, timeout=120)
        out = cli(world, "session", "story")
        as_json = json.loads(cli(world, "session", "story", "--json").stdout)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.index("== job arc-1"), out.stdout.index("== job arc-2")
    assert first < second
    assert "Write: /workspace/one.txt" in out.stdout and "Bash: echo 2 > two.txt" in out.stdout
    assert "changed: one.txt" in out.stdout
    assert [j["id"] for j in as_json] == ["arc-1", "arc-2"]
    assert any(e["kind"] == "tool_call" for e in as_json[1]["events"])
    missing = cli(world, "session", "nope")
    assert missing.returncode != 0 and "no session 'nope'" in missing.stderr


def test_status_shows_budget_running_jobs_and_disk(world, run_executor):
    script = {"busy": [Turn.tool("Bash", {"command": "sleep 4", "description": "w"}), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=1.5, memory="768m", heartbeat_interval="1s")
        running = run_executor(world.settings(budget_cpus=3.0, budget_memory="4g"))
        Spool(world.home / "spool").write(json.dumps(
            {"id": "busy", "runner": "scripted", "workspace": str(world.repo("busy")), "prompt": "busy: work"}).encode())

        def running_view():
            view = json.loads(cli(world, "status", "--json").stdout)
            rows = [r for r in view["running"] if r["job"] == "busy" and r["cpu_cores"] is not None]
            return view if rows else None

        view = wait_for(running_view, 60, "status to show the running job with a measurement")
        text = cli(world, "status")
        wait_status(running.executor.store, "busy", Status.succeeded, timeout=120)
    assert view["executor"] == "running"
    assert view["budget"]["cpus"] == 3.0 and view["budget"]["memory"] == 4 * 2**30
    assert view["reserved"]["cpus"] == 1.5 and view["reserved"]["memory"] == 768 * 2**20 + 256 * 2**20
    assert view["measured"]["executor"]["rss"] > 10 * 2**20
    busy = next(r for r in view["running"] if r["job"] == "busy")
    assert busy["disk_used"] > 0 and busy["disk_limit"] > 0  # the job's writable layers, measured
    assert view["disk"]["jobs"] >= busy["disk_used"] and view["disk"]["free"] > 0
    assert [r["runner"] for r in view["runners"]] == ["scripted"] and view["runners"][0]["state"] == "ok"
    assert text.returncode == 0 and "busy" in text.stdout and "budget     3 cpus" in text.stdout
