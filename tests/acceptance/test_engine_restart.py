"""The container engine restarted under a serving executor (an ``apt upgrade`` of the engine), on a private
engine (``tests/engine.py``: the shared one is never restarted), with the real image, the real CLI (against
the scripted API) and ``executor serve`` as a process:

- without live-restore the engine stops every container: while it is away nothing is claimed and every
  waiting job says why (``status``, ``show``, the metrics, the page); the jobs it killed are neither failed nor left ``running``
  without an owner: once it is back they are rolled back and re-queued, and every job succeeds, applied
  once, with nothing of ours left on the engine;
- with live-restore the agent's container outlives the restart and is adopted: one attempt, its
  conversation run once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from executor.store import Status
from tests.conftest import SANDBOX_IMAGE, wait_for, wait_status
from tests.postgres import free_port
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
SETTLED = {Status.succeeded, Status.failed, Status.rolled_back, Status.stalled, Status.cancelled}


@pytest.fixture(scope="module")
def engine():
    """A private engine with the sandbox image, for this module (the image is copied in once)."""
    from tests.engine import PrivateEngine

    try:
        private = PrivateEngine().start()
        private.load_image(SANDBOX_IMAGE)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield private
    private.close()


def _serve(world, engine, log: Path, **settings: str) -> subprocess.Popen:
    env = {**world.env(), "DOCKER_HOST": engine.host, "EXECUTOR_BUDGET_CPUS": "1",
           **{f"EXECUTOR_{k.upper()}": v for k, v in settings.items()}}
    return subprocess.Popen([EXECUTOR, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                            start_new_session=True)


def _cli(world, *args: str) -> dict:
    out = subprocess.run([EXECUTOR, *args, "--json"], env=world.env(), capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


PAGE_TOKEN = "engine-restart-page-token"


def _get(port: int, path: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {PAGE_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read().decode()


def _get_if(port: int, path: str, needle: str) -> str | None:
    text = _get(port, path)
    return text if needle in text else None


def _status_if(world, predicate) -> dict | None:
    status = _cli(world, "status")
    return status if predicate(status) else None


def _stop(process: subprocess.Popen, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]


def _ours(engine, world) -> list[str]:
    """What of this world's executor is on the engine (containers and volumes, labelled or named as ours)."""
    from executor.sandbox.deployment import instance_id

    prefix = f"executor-{instance_id(world.home.absolute())}-"
    client = engine.client()
    try:
        return ([c.name for c in client.containers.list(all=True) if c.name.startswith(prefix)]
                + [v.name for v in client.volumes.list() if v.name.startswith(prefix)])
    finally:
        client.close()


def _at_work(store, names: list[str]) -> list[str]:
    return [n for n in names if any(e.kind == "tool_call" for e in store.events(job_id=n))]


def work(name: str, seconds: int) -> Turn:
    return Turn.tool("Bash", {"command": f"echo half > half.txt; sleep {seconds}; rm half.txt; "
                                         f"echo {name} > out.txt", "description": "slow work"})


def test_an_engine_restart_pauses_work_and_consumes_none(world, engine, tmp_path):
    names = [f"er-{i}" for i in range(4)]  # 0.5 cpu each under a budget of 1: two run, two wait
    script = {f"{n}: work": [work(n, 25), Turn.text("Done.")] for n in names}
    log = tmp_path / "serve.log"
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command="test -f out.txt && ! test -f half.txt",
                           heartbeat_interval="1s", stall_after="120s")
        repos = {n: world.repo(n) for n in names}
        for n in names:
            world.submit(id=n, workspace=str(repos[n]), prompt=f"{n}: work")
        metrics, page = free_port(), free_port()
        process = _serve(world, engine, log, metrics_port=str(metrics), ui_port=str(page), ui_token=PAGE_TOKEN)
        try:
            wait_for(lambda: (world.home / "executor.db").exists(), 30, "the database")
            store = world.store()
            running = wait_for(lambda: found if len(found := _at_work(store, names)) == 2 else None, 120,
                               "two agents at work")
            waiting = [n for n in names if n not in running]
            assert {store.get(n).status for n in waiting} == {Status.queued}

            engine.stop()  # what `systemctl restart docker` does first: its containers are stopped
            down = wait_for(lambda: _status_if(world, lambda s: any("engine unreachable since" in p
                                                                    for p in s["problems"])), 60, "the status to say so")
            assert down["engine"]["state"] == "unreachable"
            assert down["waiting"].startswith("engine unreachable since")
            for n in waiting:  # each waiting job says why it waits
                assert _cli(world, "show", n)["waiting"].startswith("engine unreachable since"), n
            scrape = wait_for(lambda: _get_if(metrics, "/metrics", "executor_engine_up 0.0"), 30, "the metrics")
            assert "executor_engine_outages 1.0" in scrape
            assert "engine unreachable since" in _get(page, "/")  # the page says so
            for n in running:  # killed with the engine, but neither failed nor abandoned: held by their host
                assert store.get(n).status in (Status.running, Status.testing), store.get(n)
                api._keyed[f"{n}: work"].clear()  # their next attempts start afresh and finish quickly
                api.add(f"{n}: work", [work(n, 1), Turn.text("Done.")])
            held = wait_for(lambda: _status_if(world, lambda s: len(s["unsettled"]) == 2), 60,
                            "both killed jobs held")["unsettled"]
            assert {h["job"] for h in held} == set(running)
            assert all(store.get(n).status == Status.queued for n in waiting)  # nothing was claimed meanwhile

            engine.start()
            jobs = {n: wait_status(store, n, SETTLED, timeout=300) for n in names}
            _stop(process, log)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    for n, job in jobs.items():
        assert job.status == Status.succeeded, (n, job.reason, job.error, log.read_text()[-3000:])
        assert (repos[n] / "out.txt").read_text() == f"{n}\n" and not (repos[n] / "half.txt").exists()
        committing = [e for e in store.events(job_id=n) if e.kind == "state" and e.data.get("status") == "committing"]
        assert len(committing) == 1  # applied once
    for n in running:  # rolled back and re-queued, as after a kill -9 of the executor: never a failure
        assert jobs[n].attempts == 2
        states = [e.data for e in store.events(job_id=n) if e.kind == "state"]
        assert any(s.get("reason") == "interrupted" and "engine" in (s.get("error") or "") for s in states), states
    assert all(jobs[n].attempts == 1 for n in waiting)
    assert not any(e.data.get("reason") == "internal" for n in names for e in store.events(job_id=n))
    assert _ours(engine, world) == []  # no container, no volume (labelled or not) left on the engine


def test_with_live_restore_the_running_agent_is_adopted_after_the_restart(world, engine, tmp_path):
    engine.live_restore = True
    engine.restart()
    log = tmp_path / "serve.log"
    try:
        with ScriptedAPI({"lr: work": [work("lr", 15), Turn.text("Done.")]}) as api:
            world.write_runners(api.base_url)
            world.write_policy(test_command="test -f out.txt && ! test -f half.txt", heartbeat_interval="1s",
                               stall_after="120s")
            repo = world.repo("lr")
            world.submit(id="lr", workspace=str(repo), prompt="lr: work")
            process = _serve(world, engine, log)
            try:
                wait_for(lambda: (world.home / "executor.db").exists(), 30, "the database")
                store = world.store()
                wait_for(lambda: any(e.kind == "tool_call" for e in store.events(job_id="lr")), 120, "the tool call")
                engine.restart()  # its containers keep running
                job = wait_status(store, "lr", SETTLED, timeout=300)
                # Docker 20.10 never forgets a live-restored container's mount of its volume: the volume stays
                # until the engine restarts again, and the sweep after that outage removes it.
                engine.restart()
                wait_for(lambda: _ours(engine, world) == [], 60, "the sweep after the engine's return")
                _stop(process, log)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
            requests = [r for r in api.conversation if r.key == "lr: work"]
    finally:
        engine.live_restore = False
        engine.restart()

    assert (job.status, job.attempts) == (Status.succeeded, 1), (job.reason, job.error, log.read_text()[-3000:])
    events = store.events(job_id="lr")
    assert any(e.kind == "adopted" for e in events)
    assert sum(1 for e in events if e.kind == "tool_call") == 1  # the stream was not recorded twice
    assert len(requests) == 2  # one conversation: the tool call, then the answer
    assert (repo / "out.txt").read_text() == "lr\n"
