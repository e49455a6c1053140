"""The deployment as a person runs it: ``docker compose up -d --build`` with compose.yaml, then ``down``.

The stack (the executor's image and the sandbox image, both built by compose with the classic builder)
runs against a throwaway world: the state root, the workspaces and the policies are tmp directories on the
host (EXECUTOR_STATE_DIR, EXECUTOR_WORKSPACES_DIR, EXECUTOR_POLICIES_DIR), which the executor sees at its
own fixed paths and translates by inspecting its own container. tests/compose.test.yaml passes the test's
runner token and makes the health check quick. The runners point at a scripted API on 127.0.0.1 in this
process; the executor uses the host network, and the jobs (sealed, the test's default policy) reach that
API through their gateways' sockets, which the executor makes under the state root inside its container and
the engine mounts into theirs by the translated host path. Jobs arrive the way any tool on the host submits
them: a file written into the spool, naming the repository by its host path. A second test starts compose
in a fresh clone with no .env at all.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from executor.intake.spool import Spool
from executor.sandbox.deployment import instance_id
from executor.store import Status
from tests.conftest import SANDBOX_IMAGE, chown_tree, tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

ROOT = Path(__file__).resolve().parents[2]
_VENV_COMPOSE = ROOT / ".venv" / "bin" / "docker-compose"
COMPOSE = [str(_VENV_COMPOSE)] if _VENV_COMPOSE.exists() else ["docker", "compose"]
FILES = ["-f", str(ROOT / "compose.yaml"), "-f", str(ROOT / "tests" / "compose.test.yaml")]


class Stack:
    """One compose project over a test world."""

    def __init__(self, world, project: str) -> None:
        self.world = world
        self.project = project
        self.env = {k: v for k, v in world.env().items() if not k.startswith("EXECUTOR_")}
        self.env.update({
            "EXECUTOR_STATE_DIR": str(world.home), "EXECUTOR_WORKSPACES_DIR": str(world.repos),
            "EXECUTOR_POLICIES_DIR": str(world.policies),
            "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
            # Docker 20.10 without buildx: compose builds with the classic builder.
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            "COMPOSE_BAKE": "false",
        })

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*COMPOSE, "-p", self.project, *FILES, *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def containers(self, client, service: str | None = None) -> list:
        labels = [f"com.docker.compose.project={self.project}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        return client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)

    def job_containers(self, client) -> list:
        """Every container of this executor instance (its state root), whatever the job."""
        labels = ["io.executor=1", f"io.executor.instance={instance_id(self.world.home)}"]
        return client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)

    def logs(self) -> str:
        done = self.compose("logs", "--no-color", "--tail", "200", timeout=60)
        return (done.stdout + done.stderr)[-6000:]


@pytest.fixture
def stack(world, docker_client):
    chown_tree(world.repos)  # `executor doctor`: a workspace root belongs to a regular user
    s = Stack(world, f"exectest-{secrets.token_hex(4)}")
    yield s
    s.compose("down", "--remove-orphans", "--timeout", "90", timeout=180)
    for container in s.job_containers(docker_client) + s.containers(docker_client):
        container.remove(force=True)


def _health(container) -> str:
    container.reload()
    state = container.attrs["State"]
    return (state.get("Health") or {}).get("Status") or state.get("Status")


def test_compose_up_runs_a_spooled_job_and_down_requeues_the_running_one(stack, world, docker_client):
    app = world.repo("app", {"README.md": "app\n"})
    other = world.repo("other", {"README.md": "other\n", "src/main.py": "print(1)\n"})
    other_before = tree_digest(other)
    script = {
        "compose-ok": [
            Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hello from compose\n"}),
            Turn.text("Wrote hello.txt."),
        ],
        "compose-hang": [
            Turn.tool("Bash", {"command": "echo half-done > partial.txt && rm README.md", "description": "start"}),
            Turn.hang(),
        ],
    }
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="grep -q 'hello from compose' hello.txt || test -f final.txt")

        started = time.monotonic()
        up = stack.compose("up", "-d", "--build", timeout=1200)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        up_seconds = time.monotonic() - started

        (executor_container,) = stack.containers(docker_client, "executor")
        config = executor_container.attrs["HostConfig"]
        assert config["NetworkMode"] == "host"
        assert config["RestartPolicy"]["Name"] == "unless-stopped"
        assert config["Init"] is True
        assert config["Memory"] == 256 * 2**20  # the orchestration reserve (EXECUTOR_RESERVE_MEMORY default)
        binds = {m["Destination"]: m["Source"] for m in executor_container.attrs["Mounts"]}
        assert binds["/var/lib/executor"] == str(world.home) and binds["/srv/workspaces"] == str(world.repos)
        assert "/var/run/docker.sock" in binds
        (sandbox_container,) = stack.containers(docker_client, "sandbox")
        assert sandbox_container.attrs["State"]["ExitCode"] == 0  # `claude --version` in the built image

        try:
            wait_for(lambda: _health(executor_container) == "healthy", 120, "the executor to be healthy")
        except AssertionError:
            pytest.fail(f"the executor did not become healthy; logs:\n{stack.logs()}")

        # The deployed set-up passes its own doctor (the token variable is the test runner's).
        doctor = stack.compose("exec", "-T", "executor", "executor", "doctor", "--json", timeout=120)
        report = json.loads(doctor.stdout)
        assert doctor.returncode == 0 and report["ok"], doctor.stdout + doctor.stderr
        paths = next(c for c in report["checks"] if c["name"] == "host paths")
        assert paths["detail"].startswith("in container ") and f"is host path {world.home}" in paths["detail"]

        # A job arrives through the spool, written from the host.
        spool = Spool(world.home / "spool")
        spool.write(json.dumps({"id": "compose-ok", "runner": "scripted", "workspace": str(app),
                                "prompt": "compose-ok: write hello.txt"}).encode())
        store = world.store()
        try:
            job = wait_status(store, "compose-ok", {Status.succeeded, Status.failed, Status.rolled_back,
                                                    Status.cancelled}, timeout=240)
            assert job.status == Status.succeeded, (job.reason, job.error, stack.logs())
            assert (app / "hello.txt").read_text() == "hello from compose\n"
            assert (app / "hello.txt").stat().st_uid == 1000

            # A second job is mid-run when the stack goes down.
            spool.write(json.dumps({"id": "compose-hang", "runner": "scripted", "workspace": str(other),
                                    "prompt": "compose-hang: work then hang"}).encode())

            def hanging() -> bool:
                job = store.get("compose-hang")
                return api.remaining("compose-hang") == 0 and job is not None and job.status == Status.running

            wait_for(hanging, 240, "the second job's agent to reach its hung turn")
            wait_for(lambda: any(c.labels.get("io.executor.job") == "compose-hang"
                                 for c in stack.job_containers(docker_client)), 30, "the hung job's container")

            started = time.monotonic()
            down = stack.compose("down", timeout=180)
            down_seconds = time.monotonic() - started
            assert down.returncode == 0, down.stdout + down.stderr
            hung = store.get("compose-hang")
        finally:
            store.close()

    # `down` stopped the executor cleanly within its grace: the running job rolled back and is queued
    # again (not lost, not failed), and nothing of it reached the repository.
    assert down_seconds < 90, down_seconds
    assert hung.status == Status.queued, (hung.reason, hung.error)
    assert tree_digest(other) == other_before
    assert not (other / "partial.txt").exists()
    # No job container outlives the executor, and the executor's own containers are gone.
    assert stack.job_containers(docker_client) == []
    assert stack.containers(docker_client) == []
    print(f"compose up {up_seconds:.1f}s, down {down_seconds:.1f}s")


def test_compose_file_needs_nothing_set():
    """compose.yaml as compose resolves it with no variable at all: ./store, ./workspaces, ./policies at the
    executor's fixed paths, no bridge network, log rotation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    done = subprocess.run([*COMPOSE, "-p", "exectest-config", "-f", str(ROOT / "compose.yaml"), "config",
                           "--format", "json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    executor = services["executor"]
    volumes = {v["target"]: v["source"] for v in executor["volumes"]}
    assert volumes["/var/lib/executor"] == str(ROOT / "store")
    assert volumes["/srv/workspaces"] == str(ROOT / "workspaces")
    assert volumes["/etc/executor/policies"] == str(ROOT / "policies")
    assert volumes["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert executor["environment"]["EXECUTOR_HOME"] == "/var/lib/executor"
    assert executor["environment"]["EXECUTOR_WORKSPACE_ROOTS"] == "/srv/workspaces"
    assert executor["restart"] == "unless-stopped" and executor["init"] is True
    assert executor["logging"]["options"]["max-size"] == "10m"
    assert executor["healthcheck"]["test"][1:3] == ["executor", "health"]
    assert executor["depends_on"]["sandbox"]["condition"] == "service_completed_successfully"
    assert {s["network_mode"] for s in services.values()} <= {"host", "none"}
    assert services["sandbox"]["image"] == "executor-sandbox:latest"
    assert shutil.which("docker")  # the socket's engine is what compose talks to


def test_compose_up_in_a_fresh_clone_with_no_env_runs_a_job(tmp_path, docker_client):
    """The README's first screen: clone, `docker compose up -d`, put a repository under ./workspaces, submit.
    Nothing is set but the runner (a scripted API here) and its credential."""
    clone = tmp_path / "executor"
    done = subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (clone / ".env").exists()
    for cert in (ROOT / "sandbox" / "certs").glob("*.crt"):  # behind a TLS-intercepting proxy, as README says
        shutil.copy(cert, clone / "sandbox" / "certs")
    repo = clone / "workspaces" / "app"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("app\n")
    chown_tree(repo)
    project = f"exectest-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env.update({"DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0", "COMPOSE_BAKE": "false",
                "ANTHROPIC_API_KEY": "sk-fresh-clone-0000", "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE})
    compose = [*COMPOSE, "-p", project]
    script = {"fresh": [Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hello\n"}),
                        Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        (clone / "policies" / "runners.toml").write_text(
            f'[runners.claude]\nmodel = "claude-sonnet-4-5"\nauth_env = "ANTHROPIC_API_KEY"\nbase_url = "{api.base_url}"\n')
        (clone / "policies" / "default.toml").write_text('network = "host"\ntest_command = "test -f hello.txt"\n')
        try:
            up = subprocess.run([*compose, "up", "-d", "--build", "--wait"], cwd=clone, env=env, capture_output=True,
                                text=True, timeout=1200)
            assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
            job = json.dumps({"runner": "claude", "workspace": "/srv/workspaces/app", "prompt": "fresh: say hello"})
            submitted = subprocess.run([*compose, "exec", "-T", "executor", "executor", "submit", "--wait", "-"],
                                       cwd=clone, env=env, input=job, capture_output=True, text=True, timeout=300)
            logs = subprocess.run([*compose, "logs", "--tail", "60"], cwd=clone, env=env, capture_output=True,
                                  text=True, timeout=60)
            assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:] + logs.stdout[-3000:]
            assert (repo / "hello.txt").read_text() == "hello\n"
            assert (clone / "store" / "executor.db").exists()  # the state root is the clone's store/
        finally:
            subprocess.run([*compose, "down", "--timeout", "60"], cwd=clone, env=env, capture_output=True, timeout=180)
