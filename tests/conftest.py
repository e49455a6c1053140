"""Fixtures shared by the test tiers: a throwaway executor world (state root, policies, runners, a
workspace root with repositories owned by a regular user) and the real Docker engine.

Tests that need Docker fail (never skip) when the engine or the sandbox image is missing: CI has both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from executor.settings import Settings
from executor.store import Status, Store

AGENT_UID = 1000
SANDBOX_IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")
TOKEN_VAR = "TEST_RUNNER_TOKEN"
TOKEN_VALUE = "sk-test-SECRET-7f3a9c1e"  # searched for in the database and logs: it must never appear


def tree_digest(root: Path) -> str:
    """A hash of a directory tree: paths, types, modes, owners, contents, symlink targets."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}|{stat.S_IFMT(st.st_mode)}|{st.st_mode & 0o7777:o}|{st.st_uid}".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(path.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
    return h.hexdigest()


def chown_tree(root: Path, uid: int = AGENT_UID) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.lchown(dirpath, uid, uid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)


@dataclass
class World:
    """One executor's filesystem world, made fresh for a test."""

    root: Path
    home: Path
    policies: Path
    repos: Path
    base_url: str = "http://127.0.0.1:9"  # replaced by the scripted API's
    extra_env: dict[str, str] = field(default_factory=dict)
    repo_made: float = 0.0  # when the last repository was made (see submit)

    def settings(self, **overrides) -> Settings:
        values = dict(home=self.home, policies=self.policies, workspace_roots=[self.repos],
                      sandbox_image=SANDBOX_IMAGE, poll_interval=0.2, result_grace=5.0)
        values.update(overrides)
        return Settings(**values)

    def env(self) -> dict[str, str]:
        """Environment for running the `executor` command as a subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
        env.update({
            "EXECUTOR_HOME": str(self.home),
            "EXECUTOR_POLICIES": str(self.policies),
            "EXECUTOR_WORKSPACE_ROOTS": str(self.repos),
            "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
            "EXECUTOR_POLL_INTERVAL": "0.2",
            "EXECUTOR_RESULT_GRACE": "5",
            TOKEN_VAR: TOKEN_VALUE,
            **self.extra_env,
        })
        return env

    def write_runners(self, base_url: str, models: dict[str, str] | None = None, **extra: str) -> None:
        self.base_url = base_url
        models = models or {"scripted": "claude-sonnet-4-5"}
        body = ""
        for name, model in models.items():
            body += textwrap.dedent(f"""
                [runners.{name}]
                model = "{model}"
                auth_env = "{TOKEN_VAR}"
                base_url = "{base_url}"
            """)
            for key, value in extra.items():
                body += f"{key} = {value}\n"
        (self.policies / "runners.toml").write_text(body)

    def write_policy(self, name: str = "default", **fields) -> None:
        values = {"cpus": 1.0, "memory": '"1g"', "pids": 256, "timeout": '"5m"', "network": '"sealed"',
                  "test_command": '"true"', "test_timeout": '"2m"'}
        values.update({k: (json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v))
                       for k, v in fields.items()})
        (self.policies / f"{name}.toml").write_text("".join(f"{k} = {v}\n" for k, v in values.items()))

    def repo(self, name: str, files: dict[str, str] | None = None, git: bool = False) -> Path:
        path = self.repos / name
        path.mkdir(parents=True)
        for rel, content in (files or {}).items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        if git:
            subprocess.run(["git", "init", "-q", str(path)], check=True)
            subprocess.run(["git", "-C", str(path), "config", "user.email", "t@example.invalid"], check=True)
        chown_tree(path)
        self.repo_made = time.time()
        return path

    def store(self) -> Store:
        return Store(self.home / "executor.db")

    def submit(self, **job) -> str:
        """Drop a job file into the spool the way a writer does (tmp, fsync, rename); the runner defaults
        to the scripted one."""
        from executor.intake.spool import Spool

        job.setdefault("runner", "scripted")
        # A repository made a moment ago looks changed to the conflict check (it errs on the safe side
        # by CLOCK_SLACK_NS = 20 ms): let the clock move past that before the job can start.
        time.sleep(max(0.0, self.repo_made + 0.05 - time.time()))
        Spool(self.home / "spool").write(json.dumps(job).encode())
        return job["id"]


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path / "world"
    w = World(root=root, home=root / "home", policies=root / "policies", repos=root / "repos")
    for d in (w.home, w.policies, w.repos):
        d.mkdir(parents=True)
    w.write_policy()
    w.write_runners(w.base_url)
    return w


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_status(store: Store, job_id: str, statuses: set[Status] | Status, timeout: float = 120):
    wanted = {statuses} if isinstance(statuses, Status) else statuses

    def check():
        job = store.get(job_id)
        return job if job is not None and job.status in wanted else None

    try:
        return wait_for(check, timeout, f"job {job_id} to reach {sorted(s.value for s in wanted)}")
    except AssertionError:
        job = store.get(job_id)
        raise AssertionError(f"job {job_id} is {job.status.value if job else 'missing'} "
                             f"({job.reason if job else ''}: {job.error if job else ''}); "
                             f"wanted {sorted(s.value for s in wanted)}") from None


@pytest.fixture(scope="session")
def docker_client():
    """The real engine, and the sandbox image on it. Missing either is a failure, not a skip."""
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any reason the engine is unreachable fails the tier
        pytest.fail(f"the Docker engine is not reachable ({exc}); .ci/run starts it", pytrace=False)
    try:
        client.images.get(SANDBOX_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"sandbox image {SANDBOX_IMAGE} missing: docker build --network host -t {SANDBOX_IMAGE} sandbox/",
                    pytrace=False)
    yield client
    client.close()


class RunningExecutor:
    """The executor's serving loop in a thread of the test process, stopped at teardown."""

    def __init__(self, settings: Settings, secrets: dict[str, str], client) -> None:
        from executor.scheduling.service import Executor

        self.executor = Executor(settings, secrets, client)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="executor-serve", daemon=True)

    def _serve(self) -> None:
        try:
            self.executor.serve(self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported to the test at teardown
            self.error = exc
            raise

    def start(self) -> RunningExecutor:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the executor did not stop within 120 s"
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_executor(docker_client) -> Iterator[Callable[..., RunningExecutor]]:
    started: list[RunningExecutor] = []

    def start(settings: Settings, secrets: dict[str, str] | None = None) -> RunningExecutor:
        running = RunningExecutor(settings, secrets or {TOKEN_VAR: TOKEN_VALUE}, docker_client).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def disk_leftovers(home: Path) -> list[str]:
    """Mounts below the state root and loop devices bound to files in it (a job's disk image, a probe's)."""
    from executor.transaction import loopmount

    mounted = [str(m.target) for m in loopmount.mounted_below(home)]
    real = Path(os.path.realpath(home))
    return mounted + [f"{lo.device} ({lo.backing})" for lo in loopmount.loops() if real in lo.backing.parents]


def assert_no_disk_leftovers(home: Path) -> None:
    """Nothing mounted below the state root and no loop device bound to a file in it. An unmount is done when
    it returns; the loop device it held is released by the kernel's autoclear a moment later (asynchronously),
    which is waited for."""
    from executor.transaction import loopmount

    mounted = [str(m.target) for m in loopmount.mounted_below(home)]
    assert mounted == [], f"left mounted: {mounted}"
    try:
        wait_for(lambda: not disk_leftovers(home), 10, "the loop devices to be released")
    except AssertionError:
        raise AssertionError(f"left bound: {disk_leftovers(home)}") from None


def release_disks(home: Path) -> None:
    """Unmount and release whatever a test left mounted under its state root (a kept change's image stays
    mounted when its executor stops, by design), so no test leaves a mount on the machine."""
    from executor.transaction import loopmount

    for mounted in loopmount.mounted_below(home):
        loopmount.unmount(mounted.target)
    real = Path(os.path.realpath(home))
    for loop in loopmount.loops():
        if real in loop.backing.parents:
            loopmount.release(loop.device)


@pytest.fixture(autouse=True)
def _no_leftover_containers(request):
    """After a Docker test, no container or volume of the test's jobs may remain; what it left mounted goes."""
    uses_docker = "docker_client" in request.fixturenames or "run_executor" in request.fixturenames
    world = request.getfixturevalue("world") if uses_docker and "world" in request.fixturenames else None
    yield
    if world is None:
        return
    try:
        _check_containers(world)
    finally:
        release_disks(world.home)


def _check_containers(world: World) -> None:
    import docker

    from executor.sandbox.deployment import instance_id

    if not (world.home / "executor.db").exists():
        return
    store = world.store()
    job_ids = {job.id for job in store.jobs()}
    store.close()
    client = docker.from_env()
    # Scoped to this test's executor (its state root's instance) and jobs: another test session on the same
    # engine runs the same tests, with the same job ids, at the same time.
    mine = {f"io.executor.instance={instance_id(home)}" for home in (world.home, world.home.resolve())}
    containers = [c for label in mine
                  for c in client.containers.list(all=True, filters={"label": ["io.executor=1", label]},
                                                  ignore_removed=True)
                  if c.labels.get("io.executor.job") in job_ids]
    volumes = [v for label in mine for v in client.volumes.list(filters={"label": ["io.executor=1", label]})
               if (v.attrs.get("Labels") or {}).get("io.executor.job") in job_ids]
    leftovers = [c.name for c in containers] + [v.name for v in volumes]
    for c in containers:
        c.remove(force=True)
    for v in volumes:
        v.remove(force=True)
    assert not leftovers, f"leftover containers/volumes: {leftovers}"


# ------------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL 15 cluster for the session (tests/postgres.py); missing is a failure."""
    from tests.postgres import PostgresCluster

    try:
        cluster = PostgresCluster().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(postgres_cluster) -> Iterator[str]:
    """The URL of a new database of the session's cluster, its schema at the code's head (dropped after)."""
    url = postgres_cluster.migrated_database()
    yield url
    postgres_cluster.drop_database(url)


@pytest.fixture
def pg_empty_url(postgres_cluster) -> Iterator[str]:
    """The URL of a new, empty database of the session's cluster (dropped after the test)."""
    url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(url)


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """One SQLite file migrated to the code's head, copied for each test that wants a new store (migrating
    each from empty costs ~0.1 s; test_migrations covers migrating itself)."""
    from executor.store import Store

    path = tmp_path_factory.mktemp("template") / "executor.db"
    Store(path).close()
    return path


@pytest.fixture
def db_url(tmp_path: Path, migrated_sqlite: Path) -> str:
    """A new store's URL: SQLite in the unit tier (no server); tests/integration/postgres runs the same store
    tests again with this fixture giving a PostgreSQL database, so the contract holds on both engines."""
    (tmp_path / "state").mkdir()
    shutil.copyfile(migrated_sqlite, tmp_path / "state" / "executor.db")
    return f"sqlite:///{tmp_path / 'state' / 'executor.db'}"


@pytest.fixture
def empty_db_url(tmp_path: Path) -> str:
    """The URL of a database nothing has made yet (SQLite here; PostgreSQL in tests/integration/postgres)."""
    (tmp_path / "empty").mkdir()
    return f"sqlite:///{tmp_path / 'empty' / 'executor.db'}"
