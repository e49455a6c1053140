"""``executor doctor`` and ``executor health`` as a person runs them (subprocesses; doctor with the real
engine). A healthy set-up passes every check; each deliberately broken one is named, with a fix. The
path-mismatch case runs doctor where it matters: inside the executor's image, in a container whose state
root is mounted from a different host path; so does ``executor submit`` beside ``executor serve`` in such
a container (a job file naming the repository by its host path).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SANDBOX_IMAGE, TOKEN_VALUE, TOKEN_VAR, assert_no_disk_leftovers, chown_tree, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXECUTOR = ROOT / ".venv" / "bin" / "executor"
# Built from this checkout under a name of its own: other checkouts' test runs may share the engine.
EXECUTOR_IMAGE = f"executor:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"


def doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict, str]:
    done = subprocess.run([str(EXECUTOR), "doctor", "--json"], env=env, capture_output=True, text=True,
                          timeout=180, cwd=cwd)
    return done.returncode, json.loads(done.stdout), done.stderr


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


@pytest.fixture
def healthy(world):
    chown_tree(world.repos)
    return world


def test_doctor_passes_a_healthy_setup(healthy, docker_client):
    code, report, stderr = doctor(healthy.env(), healthy.root)
    assert code == 0 and report["ok"], (report, stderr)
    checks = by_name(report)
    assert {"engine", "sandbox image", "runtimes", "state root", "disk cap", "store", "host paths",
            "overlay (userxattr)", "runner tokens", "compaction model", "policy default",
            f"workspace roots: {healthy.repos}"} == set(checks)
    assert "no database yet" in checks["store"]["detail"] or "schema" in checks["store"]["detail"]
    # the runtimes the engine offers against the one in use (with how to register gVisor where it is missing)
    runtimes = checks.pop("runtimes")
    assert runtimes["status"] == "ok" and "in use: runc (EXECUTOR_DEFAULT_RUNTIME)" in runtimes["detail"], runtimes
    assert all(c["status"] == "ok" and c["fix"] is None for c in checks.values()), checks
    assert checks["policy default"]["detail"] == "network sealed; egress: nothing"
    assert TOKEN_VAR in checks["runner tokens"]["detail"]
    assert TOKEN_VALUE not in json.dumps(report)  # the variable's name, never its value
    # as root on the host, each job's layers get a disk image; the overlay probe ran on one (the engine sees it)
    assert checks["disk cap"]["detail"].startswith("disk image per job: each job's layers are an ext4 image")
    assert checks["overlay (userxattr)"]["detail"].endswith("with its upper dir on a job disk image")
    # the probes cleaned up after themselves: no probe dir, mount, loop device, container or volume
    assert not list(healthy.home.glob(".doctor-*")) and not list(healthy.home.glob(".disk-probe-*"))
    assert_no_disk_leftovers(healthy.home)
    assert docker_client.containers.list(all=True, filters={"label": "io.executor.role=doctor"}) == []
    assert docker_client.volumes.list(filters={"label": "io.executor.role=doctor"}) == []


def test_doctor_flags_unsealed_policies_a_broken_one_and_an_unpinned_compaction_model(healthy, docker_client):
    healthy.write_policy("open", network="host")
    healthy.write_policy("bridged", network="bridge")
    (healthy.policies / "broken.toml").write_text('egress = ["packages.example.com"]\n')
    env = {**healthy.env(), "EXECUTOR_COMPACTION_MODEL": "claude-haiku-4-5"}
    code, report, stderr = doctor(env, healthy.root)
    assert code == 1 and not report["ok"], (report, stderr)
    checks = by_name(report)
    for name, network in (("policy open", "host"), ("policy bridged", "bridge")):
        assert checks[name]["status"] == "warning" and f"UNSEALED: network = '{network}'" in checks[name]["detail"]
        assert 'network = "sealed"' in checks[name]["fix"]
    broken = checks["policy broken"]
    assert broken["status"] == "problem" and "'packages.example.com' has no port" in broken["detail"]
    model = checks["compaction model"]
    assert model["status"] == "problem" and "'claude-haiku-4-5'" in model["detail"]
    assert "claude-haiku-4-5-20251001" in model["fix"]
    # warnings alone do not fail: with the model pinned and the broken policy gone, doctor passes and says so
    (healthy.policies / "broken.toml").unlink()
    done = subprocess.run([str(EXECUTOR), "doctor"], env=healthy.env(), capture_output=True, text=True, timeout=180,
                          cwd=healthy.root)
    assert done.returncode == 0, done.stdout
    assert "(2 warning(s))" in done.stdout and "WARNING  policy open" in done.stdout


def test_doctor_says_when_the_watchdog_holds_the_disk_caps_and_how_to_get_images(healthy, docker_client):
    env = {**healthy.env(), "EXECUTOR_DISK_CAP": "watchdog"}
    code, report, stderr = doctor(env, healthy.root)
    assert code == 0 and report["ok"], (report, stderr)  # a warning: the fallback is a choice worth knowing
    disk = by_name(report)["disk cap"]
    assert disk["status"] == "warning" and disk["detail"].startswith("watchdog: EXECUTOR_DISK_CAP=watchdog")
    assert "unset EXECUTOR_DISK_CAP" in disk["fix"]
    assert by_name(report)["overlay (userxattr)"]["detail"].endswith(f"mounts under {healthy.home}")


def test_a_sandbox_image_built_from_another_dockerfile_is_named_by_doctor_and_refused_by_serve(healthy,
                                                                                                docker_client):
    """An image without this checkout's interface label (an old build) would fail every job obscurely
    (exit 127: no forwarder); both doctor and serve say to rebuild it instead."""
    from executor.errors import SandboxError
    from executor.sandbox.deployment import SANDBOX_INTERFACE
    from executor.scheduling.service import Executor

    stale = "executor-sandbox:stale-test"
    docker_client.images.get("debian:bookworm-slim").tag(stale)
    try:
        code, report, stderr = doctor({**healthy.env(), "EXECUTOR_SANDBOX_IMAGE": stale}, healthy.root)
        image = by_name(report)["sandbox image"]
        assert code == 1 and image["status"] == "problem", (report, stderr)
        assert "another sandbox/Dockerfile" in image["detail"] and f"needs {SANDBOX_INTERFACE}" in image["detail"]
        assert "docker build" in image["fix"]
        executor = Executor(healthy.settings(sandbox_image=stale), {}, docker_client)
        with pytest.raises(SandboxError, match=f"interface none; this executor needs {SANDBOX_INTERFACE}.*docker build"):
            executor.sandbox.check_image()
    finally:
        docker_client.images.remove(stale)


def test_doctor_names_each_problem_of_a_broken_setup(world, tmp_path, docker_client):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where a directory is expected\n")  # root ignores modes; this stops it
    env = world.env()
    env.update({
        "EXECUTOR_SANDBOX_IMAGE": "executor-sandbox:does-not-exist",
        "EXECUTOR_HOME": str(blocker / "home"),
        "EXECUTOR_WORKSPACE_ROOTS": f"{world.repos}:{tmp_path / 'missing-root'}",  # repos is root-owned
    })
    del env[TOKEN_VAR]
    code, report, stderr = doctor(env, world.root)
    assert code == 1 and not report["ok"], (report, stderr)
    checks = by_name(report)

    image = checks["sandbox image"]
    assert image["status"] == "problem" and "executor-sandbox:does-not-exist" in image["detail"]
    assert "docker build" in image["fix"] or "docker compose build" in image["fix"]

    state = checks["state root"]
    assert state["status"] == "problem" and str(blocker / "home") in state["detail"]
    assert "not writable" in state["detail"] and "mkdir" in state["fix"]

    tokens = checks["runner tokens"]
    assert tokens["status"] == "problem" and TOKEN_VAR in tokens["detail"] and "scripted" in tokens["detail"]
    assert TOKEN_VAR in tokens["fix"]

    root_owned = checks[f"workspace roots: {world.repos}"]
    assert root_owned["status"] == "problem" and "owned by root" in root_owned["detail"]
    assert "chown" in root_owned["fix"]
    missing = checks[f"workspace roots: {tmp_path / 'missing-root'}"]
    assert missing["status"] == "problem" and "does not exist" in missing["detail"]

    # the overlay probe needs an image and a state root: not run, and saying why
    assert checks["overlay (userxattr)"]["status"] == "skipped"
    assert checks["engine"]["status"] == "ok"

    # the text form names the same problems, each with its fix
    done = subprocess.run([str(EXECUTOR), "doctor"], env=env, capture_output=True, text=True, timeout=180,
                          cwd=world.root)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    problems = [line for line in lines if line.startswith("PROBLEM")]
    assert len(problems) == 5, done.stdout
    assert sum(1 for line in lines if line.strip().startswith("fix: ")) >= 5
    assert lines[-1] == "5 problem(s)"


@pytest.fixture(scope="session")
def executor_image(docker_client):
    """The executor's image as compose builds it (the classic builder caches every layer after the first)."""
    done = subprocess.run(["docker", "build", "-q", "--network", "host", "-t", EXECUTOR_IMAGE, str(ROOT)],
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return EXECUTOR_IMAGE


def run_doctor_in_container(docker_client, image: str, world, home_host: Path, home_inside: str) -> dict:
    container = docker_client.containers.run(
        image, ["doctor", "--json"], detach=True, network_mode="none",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(home_host): {"bind": home_inside, "mode": "rw"},
                 str(world.repos): {"bind": str(world.repos), "mode": "rw"},
                 str(world.policies): {"bind": "/etc/executor/policies", "mode": "ro"}},
        environment={"EXECUTOR_HOME": home_inside, "EXECUTOR_WORKSPACE_ROOTS": str(world.repos),
                     "EXECUTOR_POLICIES": "/etc/executor/policies", "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
                     TOKEN_VAR: TOKEN_VALUE},
        labels={"io.executor.test": "doctor"},
    )
    try:
        code = container.wait(timeout=180)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    report = json.loads(out) if out.strip().startswith("{") else {"checks": [], "ok": None}
    report["exit_code"] = code
    report["stderr"] = err
    return report


def test_doctor_in_a_container_with_other_host_paths_finds_them_and_the_overlay_works(healthy, executor_image,
                                                                                      docker_client):
    """The state root is at another path inside the container than on the host: the executor finds the host
    path by inspecting its own container, and the engine mounts an overlay from it."""
    inside = "/var/lib/executor-state"
    report = run_doctor_in_container(docker_client, executor_image, healthy, healthy.home, inside)
    assert report["exit_code"] == 0 and report["ok"] is True, report
    checks = by_name(report)
    paths = checks["host paths"]
    assert paths["status"] == "ok" and f"EXECUTOR_HOME {inside} is host path {healthy.home}" in paths["detail"]
    assert checks["overlay (userxattr)"]["status"] == "ok"  # the probe's overlay was built from host paths


def test_doctor_in_a_container_names_a_state_root_the_engine_cannot_reach(healthy, executor_image, docker_client):
    container = docker_client.containers.run(
        executor_image, ["doctor", "--json"], detach=True, network_mode="none",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(healthy.repos): {"bind": str(healthy.repos), "mode": "rw"},
                 str(healthy.policies): {"bind": "/etc/executor/policies", "mode": "ro"}},
        environment={"EXECUTOR_HOME": "/tmp/state", "EXECUTOR_WORKSPACE_ROOTS": str(healthy.repos),
                     "EXECUTOR_POLICIES": "/etc/executor/policies", "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
                     TOKEN_VAR: TOKEN_VALUE},
        labels={"io.executor.test": "doctor"})
    try:
        code = container.wait(timeout=180)["StatusCode"]
        report = json.loads(container.logs(stdout=True, stderr=False).decode())
    finally:
        container.remove(force=True)
    paths = by_name(report)["host paths"]
    assert code == 1 and paths["status"] == "problem" and "only inside this container" in paths["detail"]
    assert "bind-mount the state root" in paths["fix"]


def test_doctor_in_a_container_with_identical_paths_passes(healthy, executor_image, docker_client):
    report = run_doctor_in_container(docker_client, executor_image, healthy, healthy.home, str(healthy.home))
    assert report["exit_code"] == 0 and report["ok"] is True, report
    paths = by_name(report)["host paths"]
    assert paths["status"] == "ok" and paths["detail"].startswith("in container ")
    assert by_name(report)["overlay (userxattr)"]["status"] == "ok"
    # the executor's container (as compose runs it: no CAP_SYS_ADMIN) holds the disk caps by the watchdog
    disk = by_name(report)["disk cap"]
    assert disk["status"] == "warning" and "no CAP_SYS_ADMIN" in disk["detail"], disk
    assert "rshared" in disk["fix"] and "Without compose" in disk["fix"]


def test_submit_in_the_executors_container_takes_a_host_path_as_the_spool_does(healthy, executor_image,
                                                                             docker_client):
    """``executor serve`` in its container sees the workspaces at /srv/workspaces (compose's layout); a job
    file naming the repository by its host path is accepted by ``executor submit`` there, as the spool would
    accept it, and the job's workspace is the path the executor sees."""
    repo = healthy.repo("app")
    container = docker_client.containers.run(
        executor_image, ["serve"], detach=True, network_mode="none",
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(healthy.home): {"bind": "/var/lib/executor", "mode": "rw"},
                 str(healthy.repos): {"bind": "/srv/workspaces", "mode": "rw"},
                 str(healthy.policies): {"bind": "/etc/executor/policies", "mode": "ro"}},
        environment={"EXECUTOR_HOME": "/var/lib/executor", "EXECUTOR_WORKSPACE_ROOTS": "/srv/workspaces",
                     "EXECUTOR_POLICIES": "/etc/executor/policies", "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
                     "EXECUTOR_DISK_RESERVE": str(2**62), "EXECUTOR_POLL_INTERVAL": "0.2",  # holds every job
                     TOKEN_VAR: TOKEN_VALUE},
        labels={"io.executor.test": "submit"})

    def in_container(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", "-i", container.id, "executor", *args], input=stdin,
                              capture_output=True, text=True, timeout=120)

    try:
        wait_for(lambda: (healthy.home / "status.json").exists() or container.reload() or
                 container.status == "exited", 120, "the executor's first snapshot")
        assert (healthy.home / "status.json").exists(), container.logs().decode()[-3000:]
        job = {"runner": "scripted", "workspace": str(repo), "prompt": "p"}  # the host's path
        done = in_container("submit", "-", stdin=json.dumps(job))
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.strip()
        view = wait_for(lambda: json.loads(in_container("show", job_id, "--json").stdout or "null"), 60,
                        f"job {job_id} taken in")
        assert view["workspace"] == "/srv/workspaces/app" and view["status"] == "queued"
        # a path that is under no bind mount is still refused, naming the roots
        outside = in_container("submit", "-", stdin=json.dumps({**job, "workspace": "/elsewhere/app"}))
        assert outside.returncode == 1 and "not under a workspace root (/srv/workspaces)" in outside.stderr
    finally:
        container.stop(timeout=60)
        container.remove(force=True)


def test_host_paths_translate_both_ways_by_the_nearest_bind():
    from executor.sandbox.hostpaths import HostPaths

    paths = HostPaths.from_mounts([
        {"Type": "bind", "Source": "/home/me/executor/store", "Destination": "/var/lib/executor"},
        {"Type": "bind", "Source": "/data/repos", "Destination": "/srv/workspaces"},
        {"Type": "bind", "Source": "/srv", "Destination": "/srv"},
        {"Type": "volume", "Name": "vol", "Source": "/var/lib/docker/volumes/vol/_data", "Destination": "/vol"},
    ], container="c" * 64)
    assert paths.to_host("/var/lib/executor/jobs/j1/upper") == "/home/me/executor/store/jobs/j1/upper"
    assert paths.to_host("/srv/workspaces/app") == "/data/repos/app"  # the nearest mount decides, not /srv
    assert paths.to_host("/srv/other") == "/srv/other" and paths.to_host("/vol/x") == "/vol/x"
    assert paths.to_container("/data/repos/app") == "/srv/workspaces/app"
    assert paths.to_container("/home/me/executor/store") == "/var/lib/executor"
    assert HostPaths().to_host("/x/y") == "/x/y"  # outside a container: the identity


def _health(world, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXECUTOR), "health", "--max-age", "30"], env=world.env(), capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_health_fails_without_a_recent_tick(world):
    status = world.home / "status.json"
    absent = _health(world, world.root)
    assert absent.returncode == 1 and "status.json" in absent.stderr

    status.write_text(json.dumps({"ts": time.time() - 120}))
    stale = _health(world, world.root)
    assert stale.returncode == 1 and re.search(r"ticked 1[2-9]\ds ago", stale.stderr), stale.stderr

    status.write_text(json.dumps({"ts": time.time()}))
    fresh = _health(world, world.root)
    assert fresh.returncode == 0, fresh.stderr

    status.write_text("{half a fi")
    assert _health(world, world.root).returncode == 1
