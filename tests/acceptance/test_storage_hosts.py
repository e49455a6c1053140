"""Hosts that do not share storage, deployed as the README's second-host recipe deploys them: two compose
projects of ``compose.yaml`` (the executor's image built from this tree, host network, the engine's
socket), each with its own state root and its own directory mounted at ``/srv/workspaces``, one PostgreSQL
(tests/postgres.py) named by ``EXECUTOR_DATABASE_URL``, each host's settings in its own override file as a
person's ``.env`` would hold them. Both hosts hold repositories of the same names and different content,
and jobs arrive in each host's spool naming ``/srv/workspaces/NAME``: every job runs on the host that
accepted it and succeeds (its test checks it ran on its own host's repository), and the other host's
repositories are untouched. Jobs of a host that is stopped wait, saying why, and run when it returns.

And two ``executor serve`` processes on one machine sharing one directory as their root (the marker the
first writes says it is one storage): a job one host accepted is taken by the other while the first is
full.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from executor.intake.storage import MARKER
from executor.intake.spool import Spool
from executor.sandbox.deployment import instance_id
from executor.store import Status, Store
from tests.acceptance.test_multihost import Host
from tests.conftest import SANDBOX_IMAGE, chown_tree, tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

ROOT = Path(__file__).resolve().parents[2]
_VENV_COMPOSE = ROOT / ".venv" / "bin" / "docker-compose"
COMPOSE = [str(_VENV_COMPOSE)] if _VENV_COMPOSE.exists() else ["docker", "compose"]
IMAGE = f"executor:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
REPOS = ("app", "lib")
CHECK = "cmp -s out.txt owner.txt"  # the job's test: it changed the repository of the host it ran on


@pytest.fixture(scope="module")
def executor_image() -> str:
    """The executor's image from this tree's Dockerfile (the classic builder; cached layers make it quick)."""
    built = subprocess.run(["docker", "build", "--network", "host", "-q", "-t", IMAGE, str(ROOT)],
                           env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return IMAGE


class Box:
    """One machine of the recipe: its compose project, state root and its own ``/srv/workspaces``."""

    def __init__(self, world, name: str, url: str, image: str, base: Path) -> None:
        self.name, self.project = name, f"exectest-{name}-{instance_id(base)[:8]}"
        self.home, self.workspaces = base / name / "state", base / name / "workspaces"
        self.home.mkdir(parents=True)
        self.workspaces.mkdir(parents=True)
        override = base / name / "host.yaml"  # what the recipe puts into this host's .env
        override.write_text(json.dumps({"services": {"executor": {"environment": {
            "EXECUTOR_HOST_ID": name, "EXECUTOR_DATABASE_URL": url, "EXECUTOR_BUDGET_CPUS": "0.5",
            "EXECUTOR_BUDGET_MEMORY": "1g", "EXECUTOR_HOST_HEARTBEAT": "1", "EXECUTOR_CLAIM_POLL": "1",
            "EXECUTOR_DISK_RESERVE": "1g"}}}}))
        self.files = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "tests" / "compose.test.yaml"),
                      "-f", str(override)]
        self.env = {k: v for k, v in world.env().items() if not k.startswith("EXECUTOR_")}
        self.env.update({"EXECUTOR_STATE_DIR": str(self.home), "EXECUTOR_WORKSPACES_DIR": str(self.workspaces),
                         "EXECUTOR_POLICIES_DIR": str(world.policies), "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
                         "EXECUTOR_IMAGE": image})

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*COMPOSE, "-p", self.project, *self.files, *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def repo(self, name: str) -> Path:
        path = self.workspaces / name
        path.mkdir()
        (path / "owner.txt").write_text(f"{self.name}\n")  # same name, different content on each host
        chown_tree(self.workspaces)
        return path

    def up(self) -> None:
        done = self.compose("up", "-d", "--no-build", "--wait", timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + self.logs()

    def stop(self) -> None:
        done = self.compose("stop", "-t", "90", "executor", timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    def submit(self, job_id: str, repo: str) -> None:
        Spool(self.home / "spool").write(json.dumps({
            "id": job_id, "runner": "scripted", "workspace": f"/srv/workspaces/{repo}",
            "prompt": f"{job_id}: write out.txt"}).encode())

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", "executor", "executor", *args, timeout=120)

    def logs(self) -> str:
        done = self.compose("logs", "--no-color", "--tail", "100", timeout=60)
        return (done.stdout + done.stderr)[-4000:]

    def down(self, docker_client) -> None:
        self.compose("down", "--remove-orphans", "--timeout", "90", timeout=180)
        labels = ["io.executor=1", f"io.executor.instance={instance_id(self.home)}"]
        for container in docker_client.containers.list(all=True, filters={"label": labels}, ignore_removed=True):
            container.remove(force=True)


def _writes(job_id: str, owner: str) -> list[Turn]:
    return [Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": f"{owner}\n"}), Turn.text("Done.")]


def test_two_hosts_each_with_its_own_srv_workspaces_run_every_job_where_it_was_accepted(
        world, docker_client, pg_url, tmp_path, executor_image):
    boxes = [Box(world, name, pg_url, executor_image, tmp_path) for name in ("box1", "box2")]
    repos = {(box.name, name): box.repo(name) for box in boxes for name in REPOS}
    jobs = {f"{box}-{name}": (box, name) for box, name in repos}
    script = {job_id: _writes(job_id, box) for job_id, (box, _) in jobs.items()}
    # box2 is full while w1 runs; w2 waits behind it; both wait while box2 is stopped
    script["w1"] = [Turn.tool("Bash", {"command": "echo half > half.txt; sleep 300", "description": "slow"})]
    script["w2"] = _writes("w2", "box2")
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command=CHECK)
        store = Store(pg_url)
        try:
            for box in boxes:
                box.up()
            for job_id, (name, repo) in jobs.items():  # same paths, each host's own spool
                next(b for b in boxes if b.name == name).submit(job_id, repo)
            done = {job_id: wait_status(store, job_id, SETTLED, timeout=300) for job_id in jobs}
            attempts = {job_id: store.attempts(job_id) for job_id in jobs}
            after = {key: tree_digest(path) for key, path in repos.items()}
            markers = {box.name: (box.workspaces / MARKER).read_text().strip() for box in boxes}

            box1, box2 = boxes
            (box2.workspaces / "app" / "out.txt").unlink()
            chown_tree(box2.workspaces)
            box2.submit("w1", "app")
            wait_for(lambda: any(e.kind == "tool_call" for e in store.events(job_id="w1")), 240,
                     "w1's slow tool call on box2")
            box2.submit("w2", "lib")
            wait_for(lambda: store.get("w2") is not None, 60, "box2 to accept w2")
            box2.stop()  # w1 rolls back and waits again; neither may run on box1, where the paths are others
            waiting = {job_id: store.get(job_id) for job_id in ("w1", "w2")}

            def explained() -> str:
                out = box1.cli("show", "w2")
                return out.stdout if "no host that holds it is running" in out.stdout else ""

            shown = wait_for(explained, 60, "box1's show to say why w2 waits")
            status = json.loads(box1.cli("status", "--json").stdout)
            still = {job_id: store.get(job_id).status for job_id in ("w1", "w2")}
            api._keyed["w1"].clear()
            api.add("w1", _writes("w1", "box2"))
            box2.up()
            later = {job_id: wait_status(store, job_id, SETTLED, timeout=300) for job_id in ("w1", "w2")}
            later_attempts = {job_id: store.attempts(job_id) for job_id in ("w1", "w2")}
        finally:
            store.close()
            for box in boxes:
                box.down(docker_client)

    for job_id, (name, _) in jobs.items():
        job = done[job_id]
        assert (job.status, job.host_id) == (Status.succeeded, name), (job_id, job.host_id, job.reason, job.error)
        assert [a.host_id for a in attempts[job_id]] == [name]
    for (name, repo), path in repos.items():  # each repository got only its own host's job
        assert sorted(p.name for p in path.iterdir()) == ["out.txt", "owner.txt"], path
        assert (path / "out.txt").read_text() == f"{name}\n" == (path / "owner.txt").read_text()
    assert markers["box1"] != markers["box2"]  # each host's own disk is its own storage
    assert {j: (w.status, w.spool_host) for j, w in waiting.items()} == {"w1": (Status.queued, "box2"),
                                                                        "w2": (Status.queued, "box2")}
    assert still == {"w1": Status.queued, "w2": Status.queued}  # box1 never took them
    assert "box2 (stopped)" in shown and "another directory" in shown
    assert {h["host"]: h["state"] for h in status["hosts"]} == {"box1": "alive", "box2": "stopped"}
    for job_id in ("w1", "w2"):
        assert (later[job_id].status, later[job_id].host_id) == (Status.succeeded, "box2"), later[job_id].error
        assert {a.host_id for a in later_attempts[job_id]} == {"box2"}
    assert (repos[("box2", "app")] / "out.txt").read_text() == "box2\n"
    assert not (repos[("box2", "app")] / "half.txt").exists()  # the stopped attempt was rolled back
    assert tree_digest(repos[("box1", "app")]) == after[("box1", "app")]  # box1's untouched throughout
    assert tree_digest(repos[("box1", "lib")]) == after[("box1", "lib")]


def test_two_executors_sharing_one_root_both_take_its_jobs(world, docker_client, pg_url, tmp_path):
    """host-a accepts both jobs; while its budget is full with the first, host-b (the same storage: the
    marker host-a wrote) takes the second."""
    for name in ("s1", "s2"):
        (world.repos / name).mkdir()
    chown_tree(world.repos)
    script = {"s1": [Turn.tool("Bash", {"command": "sleep 60", "description": "slow"}),
                     Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": "s1\n"}), Turn.text("Done.")],
              "s2": [Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": "s2\n"}), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command="test -f out.txt", network="host")
        host_a = Host(world, "host-a", pg_url, [world.repos], 0.5, "1g", tmp_path).start()
        host_b = Host(world, "host-b", pg_url, [world.repos], 0.5, "1g", tmp_path).start()
        store = Store(pg_url)
        try:
            host_a.submit("s1", world.repos / "s1", "s1: work")
            wait_for(lambda: (j := store.get("s1")) is not None and j.host_id is not None, 120, "s1 to be claimed")
            first = store.get("s1").host_id
            (host_a if first == "host-a" else host_b).submit("s2", world.repos / "s2", "s2: work")
            s2 = wait_status(store, "s2", SETTLED, timeout=240)
            s1 = wait_status(store, "s1", SETTLED, timeout=240)
            host_a.stop()
            host_b.stop()
        finally:
            for host in (host_a, host_b):
                if host.process and host.process.poll() is None:
                    host.kill()
            store.close()
        assert api.remaining("s1") == 0
    assert (s1.status, s2.status) == (Status.succeeded, Status.succeeded), (s1.error, s2.error)
    assert {s1.host_id, s2.host_id} == {"host-a", "host-b"}  # the other host took the job the first accepted
    assert s1.storage == s2.storage == (world.repos / MARKER).read_text().strip()
