"""The state root's file system filling up under a serving executor (a small loop-mounted ext4 as the state
root, filled by another writer), with the real engine, image and CLI and ``executor serve`` as a process:

- below the disk reserve, no job starts and the waiting jobs say why (``status``, ``show``);
- full to the last block (the store's writes fail with ``SQLITE_FULL``, the status file cannot be
  replaced), the executor serves on, loses no job file that reached the spool, and fails no job
  ``internal``; once there is room again every job ends exactly once, the store passes its integrity
  check and the repositories hold exactly the changes of the jobs that succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from executor.intake.spool import Spool
from executor.sandbox.deployment import instance_id
from executor.store import Status
from tests.conftest import wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
SETTLED = {Status.succeeded, Status.failed, Status.rolled_back, Status.stalled, Status.cancelled, Status.rejected}
MiB = 2**20


@pytest.fixture
def small_state_root(world, tmp_path):
    """The world's state root on its own 256 MiB ext4 (a loop mount), unmounted after the test."""
    image = tmp_path / "state.img"
    with image.open("wb") as f:
        f.truncate(256 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(world.home)], check=True, capture_output=True)
    yield world.home
    subprocess.run(["umount", str(world.home)], check=False, capture_output=True)
    if os.path.ismount(world.home):
        subprocess.run(["umount", "-l", str(world.home)], check=False, capture_output=True)


def _fill(home: Path, name: str, leave: int | None = None) -> Path:
    """Take the free space under ``home`` down to ``leave`` bytes, or (None) to the last block a writer as root
    can take (the file system's reserved blocks too)."""
    path = home / name
    with path.open("ab") as f:
        for size in (MiB, 4096):
            while leave is None or shutil.disk_usage(home).free > leave:
                try:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    break
    return path


class Filler:
    """Another writer that keeps the state root full: whatever room appears (a job's disk image removed, its
    deleted blocks discarded) it takes again at once, until stopped; then its file goes."""

    def __init__(self, home: Path, name: str) -> None:
        self.path = _fill(home, name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_full, args=(home,), daemon=True)
        self._thread.start()

    def _keep_full(self, home: Path) -> None:
        while not self._stop.wait(0.05):
            _fill(home, self.path.name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.path.unlink()


def _started(store, names: list[str]) -> set[str]:
    return {n for n in names if (job := store.get(n)) is not None and job.attempts > 0}


def _cli(world, *args: str) -> dict:
    out = subprocess.run([EXECUTOR, *args, "--json"], env=world.env(), capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _status_if(world, predicate) -> dict | None:
    status = _cli(world, "status")
    return status if predicate(status) else None


def test_a_full_state_root_stops_new_starts_and_corrupts_nothing(world, docker_client, small_state_root, tmp_path):
    home = small_state_root
    names = [f"fd-{i}" for i in range(6)]
    late = ["fd-late-0", "fd-late-1"]  # their files land in the spool while the disk is full
    script = {f"{n}: work": [Turn.tool("Bash", {"command": f"sleep 6; echo {n} > out.txt", "description": "w"}),
                             Turn.text("Done.")] for n in names + late}
    log = tmp_path / "serve.log"
    with ScriptedAPI(script, replay=True) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command="test -f out.txt", heartbeat_interval="1s",
                           stall_after="120s")
        repos = {n: world.repo(n) for n in names + late}
        for n in names:
            world.submit(id=n, workspace=str(repos[n]), prompt=f"{n}: work")
        env = {**world.env(), "EXECUTOR_BUDGET_CPUS": "1", "EXECUTOR_DISK_RESERVE": "64m"}
        fillers: list[Filler] = []
        process = subprocess.Popen([EXECUTOR, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                                   start_new_session=True)
        try:
            wait_for(lambda: (home / "executor.db").exists(), 30, "the database")
            store = world.store()
            wait_for(lambda: len(_started(store, names)) >= 2, 120, "two jobs started")

            # Below the reserve: nothing more starts, and the waiting jobs say why.
            reserve = _fill(home, "filler-reserve", leave=32 * MiB)
            short = wait_for(lambda: _status_if(world, lambda s: "EXECUTOR_DISK_RESERVE" in (s["waiting"] or "")),
                             60, "the status to name the reserve")
            head = short["waiting"].split()[1]
            assert "below EXECUTOR_DISK_RESERVE" in _cli(world, "show", head)["waiting"]
            started = _started(store, names)
            time.sleep(3)  # a few more rounds of the loop below the reserve
            assert _started(store, names) == started  # nothing started below it
            reserve.unlink()

            # Full to the last block while jobs run, with job files arriving meanwhile (written before, moved in
            # now): the store's writes fail, the status file cannot be replaced, the loop serves on.
            wait_for(lambda: len(_started(store, names)) >= len(started) + 1, 120, "jobs running again")
            spool = Spool(home / "spool")
            written = [spool.tmp / f"{n}.json" for n in late]
            for n, path in zip(late, written, strict=True):
                path.write_text(json.dumps({"id": n, "runner": "scripted", "workspace": str(repos[n]),
                                            "prompt": f"{n}: work"}))
            fillers.append(Filler(home, "filler-full"))
            for path in written:
                os.rename(path, spool.incoming / path.name)
            full = wait_for(lambda: _status_if(world, lambda s: s["executor"] == "not running"), 60,
                            "the status file to go stale")
            assert any("file system is full" in p for p in full["problems"])
            wait_for(lambda: "disk is full" in log.read_text(), 60, "the loop to meet the full disk")
            stuck = _started(store, names)
            time.sleep(10)  # the disk stays full for a while: job threads and heartbeats meet it too
            assert process.poll() is None, log.read_text()[-3000:]  # it serves on
            assert _started(store, names) == stuck  # nothing started on a full disk

            while fillers:  # room again
                fillers.pop().stop()
            jobs = {n: wait_status(store, n, SETTLED, timeout=400) for n in names + late}
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            while fillers:
                fillers.pop().stop()
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    assert sorted(os.listdir(home / "spool" / "incoming")) == []  # every job file reached the store
    for n, job in jobs.items():
        events = store.events(job_id=n)
        assert not any(e.data.get("reason") == "internal" for e in events), (n, job.error)
        ended = [e for e in events if e.kind == "state" and e.data.get("status") in {s.value for s in SETTLED}]
        assert len(ended) == 1, (n, [e.data for e in events if e.kind == "state"])  # ended exactly once
        if job.status == Status.succeeded:
            assert (repos[n] / "out.txt").read_text() == f"{n}\n"
        else:  # the reserve stopped it: rolled back, nothing applied
            assert job.reason == "disk_reserve" and not (repos[n] / "out.txt").exists(), (n, job.reason, job.error)
    assert all(jobs[n].status == Status.succeeded for n in late)  # taken in while full, run once there was room
    instance = instance_id(home.absolute())  # nothing of this executor's is left on the engine
    assert not docker_client.containers.list(all=True, filters={"label": f"io.executor.instance={instance}"})
    assert not [v.name for v in docker_client.volumes.list() if v.name.startswith(f"executor-{instance}-")]
    conn = sqlite3.connect(home / "executor.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
