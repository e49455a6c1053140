"""Several hosts share one PostgreSQL queue: ``executor serve`` processes with their own state roots, budgets
and workspace roots against a real PostgreSQL 15 started by the suite, the real engine, sandbox image and
Claude Code CLI (against the scripted Messages API on loopback).

- 300 jobs over three hosts: each claimed and run exactly once, no host's budget ever exceeded (the
  engine's containers sampled by their labels), a root only one host holds claimed only by that host;
- ``kill -9`` of a host mid-job (its containers gone with it): the job under a root another host holds is
  rolled back and re-queued there and applied once; the job under a root only the lost host holds waits
  for it and is recovered when it returns;
- a 429 seen by host A cools the runner on host B too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import docker

from executor.clock import aware
from executor.intake.spool import Spool
from executor.sandbox.deployment import instance_id
from executor.store import Status, Store
from tests.conftest import chown_tree, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
GiB = 2**30


class Host:
    """One ``executor serve`` process: its own state root, budget and workspace roots, the shared store."""

    def __init__(self, world, name: str, url: str, roots: list[Path], cpus: float, memory: str, log_dir: Path,
                 **env: str) -> None:
        self.name, self.home = name, world.root / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.cpus, self.memory = cpus, memory
        self.log = log_dir / f"{name}.log"
        self.env = {**world.env(), "EXECUTOR_HOME": str(self.home), "EXECUTOR_DATABASE_URL": url,
                    "EXECUTOR_HOST_ID": name, "EXECUTOR_WORKSPACE_ROOTS": ":".join(str(r) for r in roots),
                    "EXECUTOR_BUDGET_CPUS": str(cpus), "EXECUTOR_BUDGET_MEMORY": memory,
                    "EXECUTOR_RESERVE_MEMORY": "256m", "EXECUTOR_HOST_HEARTBEAT": "1",
                    "EXECUTOR_HOST_TIMEOUT": "5", "EXECUTOR_CLAIM_POLL": "1", "EXECUTOR_DISK_RESERVE": "1g", **env}
        self.process: subprocess.Popen | None = None

    @property
    def instance(self) -> str:
        return instance_id(self.home.absolute())

    def start(self) -> Host:
        self.process = subprocess.Popen([EXECUTOR, "serve"], env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("ab"), start_new_session=True)
        wait_for(lambda: (self.home / "status.json").exists() or self.process.poll() is not None, 60,
                 f"{self.name} to tick")
        assert self.process.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
        return self

    def submit(self, job_id: str, workspace: Path, prompt: str, **fields) -> None:
        Spool(self.home / "spool").write(json.dumps({"id": job_id, "runner": "scripted", "workspace": str(workspace),
                                                     "prompt": prompt, **fields}).encode())

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=120) == 0, self.log.read_text()[-3000:]

    def status(self) -> dict:
        out = subprocess.run([EXECUTOR, "status", "--json"], env=self.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


class Sampler:
    """Asks the engine (not the executor) every 0.2 s which job containers of each host run."""

    def __init__(self, hosts: list[Host]) -> None:
        self.client = docker.from_env(timeout=120)
        self.hosts = {h.instance: h for h in hosts}
        self.max_cpus = Counter()
        self.max_memory = Counter()
        self.max_count = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            nano, memory, count = Counter(), Counter(), Counter()
            for c in self.client.containers.list(filters={"label": "io.executor=1", "status": "running"},
                                                 ignore_removed=True):
                instance = c.labels.get("io.executor.instance")
                if instance not in self.hosts:
                    continue
                config = c.attrs.get("HostConfig") or {}
                nano[instance] += config.get("NanoCpus") or 0
                memory[instance] += config.get("Memory") or 0
                count[instance] += 1
            for instance, host in self.hosts.items():
                self.max_cpus[host.name] = max(self.max_cpus[host.name], nano[instance] / 1e9)
                self.max_memory[host.name] = max(self.max_memory[host.name], memory[instance])
                self.max_count[host.name] = max(self.max_count[host.name], count[instance])
            self.samples += 1
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _repos(world, root: Path, names: list[str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    repos = []
    for name in names:
        (root / name).mkdir()
        repos.append(root / name)
    chown_tree(root)
    return repos


def _remove_containers(host: Host) -> None:
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"io.executor.instance={host.instance}"}):
        c.remove(force=True)


def test_three_hosts_run_300_jobs_exactly_once_within_their_budgets(world, docker_client, pg_url, tmp_path):
    shared = world.repos  # every host holds it
    only_c = world.root / "only-c"  # a second root only host-c holds
    repos = _repos(world, shared, [f"r{i:02d}" for i in range(30)])
    c_repos = _repos(world, only_c, [f"c{i}" for i in range(3)])
    with ScriptedAPI(default=Turn.text("Done.")) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.25, memory="256m", pids=128, test_command="true", network="host")
        hosts = [Host(world, "host-a", pg_url, [shared], 1.0, "1280m", tmp_path),
                 Host(world, "host-b", pg_url, [shared], 0.75, "1g", tmp_path),
                 Host(world, "host-c", pg_url, [shared, only_c], 0.5, "768m", tmp_path)]
        jobs = {f"mh-{i:03d}": repos[i % 30] for i in range(285)}
        jobs.update({f"mh-{i:03d}": c_repos[i % 3] for i in range(285, 300)})
        store = Store(pg_url)
        try:
            with Sampler(hosts) as sampler:
                for host in hosts:
                    host.start()
                for n, (job_id, repo) in enumerate(jobs.items()):  # each host's spool takes a third
                    spool_host = hosts[n % 3] if repo.parent == shared else hosts[2]
                    spool_host.submit(job_id, repo, f"{job_id}: reply Done.")
                wait_for(lambda: store.counts().get(Status.succeeded, 0) + sum(
                    store.counts().get(st, 0) for st in SETTLED - {Status.succeeded}) >= 300, 3000,
                    "300 jobs to settle", interval=5)
                statuses = {h.name: h.status() for h in hosts}
            for host in hosts:
                host.stop()
            rows = {job_id: store.get(job_id) for job_id in jobs}
            attempts = {job_id: store.attempts(job_id) for job_id in jobs}
        finally:
            for host in hosts:
                if host.process and host.process.poll() is None:
                    host.kill()
            store.close()
        texts = [r.first_user_text for r in api.conversation]
        requests = Counter(job_id for job_id in jobs for text in texts if f"{job_id}: reply" in text)

    failed = {j: (r.status.value, r.reason, r.error) for j, r in rows.items() if r.status != Status.succeeded}
    assert not failed, failed
    assert all(r.attempts == 1 for r in rows.values())
    assert all(len(a) == 1 and a[0].host_id == rows[j].host_id for j, a in attempts.items())  # claimed once
    assert requests == Counter({job_id: 1 for job_id in jobs})  # each conversation ran exactly once
    per_host = Counter(r.host_id for r in rows.values())
    assert set(per_host) == {"host-a", "host-b", "host-c"}, per_host  # the work was shared
    assert {rows[j].host_id for j in jobs if jobs[j].parent == only_c} == {"host-c"}
    assert sampler.samples > 50
    for host in hosts:  # the engine's own figures: no host ever ran more than its budget
        assert sampler.max_cpus[host.name] <= host.cpus + 1e-6, (host.name, sampler.max_cpus)
        budget = int(host.memory.rstrip("mg")) * (2**20 if host.memory.endswith("m") else GiB)
        assert sampler.max_memory[host.name] + 256 * 2**20 <= budget, (host.name, sampler.max_memory)
    assert max(sampler.max_count.values()) >= 2
    seen = {h["host"] for h in statuses["host-a"]["hosts"]}  # one system: every host sees every host
    assert seen == {"host-a", "host-b", "host-c"} and statuses["host-a"]["host"] == "host-a"


def test_kill_9_of_a_host_mid_job(world, docker_client, pg_url, tmp_path):
    """K1 lies under a root host-b also holds: taken over, run again from clean on host-b, applied once.
    K2 lies under a root only host-a holds: it waits for host-a, whose recovery re-runs it when it returns."""
    only_a = world.root / "only-a"
    (k1_repo,) = _repos(world, world.repos, ["k1"])
    (k2_repo,) = _repos(world, only_a, ["k2"])
    slow = [Turn.tool("Bash", {"command": "echo half > half.txt; sleep 60", "description": "slow"}),
            Turn.text("Done.")]
    with ScriptedAPI({"kill-k1": list(slow), "kill-k2": list(slow)}) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command="test -f out.txt && ! test -f half.txt",
                           heartbeat_interval="1s", stall_after="120s")
        host_a = Host(world, "host-a", pg_url, [world.repos, only_a], 2.0, "2g", tmp_path).start()
        host_b = Host(world, "host-b", pg_url, [world.repos], 2.0, "2g", tmp_path)
        store = Store(pg_url)
        try:
            host_a.submit("k1", k1_repo, "kill-k1: work")
            host_a.submit("k2", k2_repo, "kill-k2: work")
            for name in ("k1", "k2"):
                wait_for(lambda n=name: any(e.kind == "tool_call" for e in store.events(job_id=n)), 120,
                         f"{name}'s tool call on host-a")
            host_a.kill()
            _remove_containers(host_a)  # the machine died: its containers went with it
            for key in ("kill-k1", "kill-k2"):  # the next attempts start afresh and finish at once
                api._keyed[key].clear()
                api.add(key, [Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": "once\n"}),
                              Turn.text("Done.")])
            host_b.start()
            k1 = wait_status(store, "k1", SETTLED, timeout=240)
            k2 = store.get("k2")
            assert (k2.status, k2.host_id) == (Status.running, "host-a") and k2.interrupted_at is not None
            assert store.get("k2").attempts == 1  # host-b never claimed it: only host-a holds its root
            host_a.start()  # host-a returns: its recovery re-queues k2 from clean and runs it
            k2 = wait_status(store, "k2", SETTLED, timeout=240)
            host_a.stop()
            host_b.stop()
            events = {name: store.events(job_id=name) for name in ("k1", "k2")}
            attempts = {name: store.attempts(name) for name in ("k1", "k2")}
        finally:
            for host in (host_a, host_b):
                if host.process and host.process.poll() is None:
                    host.kill()
            store.close()

    assert (k1.status, k1.host_id, k1.attempts) == (Status.succeeded, "host-b", 2), (k1.reason, k1.error)
    assert [(a.host_id, a.outcome) for a in attempts["k1"]] == [("host-a", "host_lost"), ("host-b", "success")]
    assert (k2.status, k2.host_id, k2.attempts) == (Status.succeeded, "host-a", 2), (k2.reason, k2.error)
    assert [a.host_id for a in attempts["k2"]] == ["host-a", "host-a"]
    for name, repo in (("k1", k1_repo), ("k2", k2_repo)):
        committing = [e for e in events[name] if e.kind == "state" and e.data.get("status") == "committing"]
        assert len(committing) == 1  # applied once
        assert (repo / "out.txt").read_text() == "once\n"
        assert not (repo / "half.txt").exists()  # the lost attempt's work was rolled back, never applied
    takeover = [e.data for e in events["k1"] if e.kind == "state" and e.data.get("taken_over_by")]
    assert takeover and takeover[0]["lost_host"] == "host-a" and takeover[0]["taken_over_by"] == "host-b"
    assert any(e.kind == "host_lost" for e in events["k2"])
    assert not docker.from_env().containers.list(all=True, filters={"label": f"io.executor.instance={host_a.instance}"})


def test_a_429_on_host_a_makes_host_b_wait_for_the_same_runner(world, docker_client, pg_url, tmp_path):
    only_b = world.root / "only-b"
    (a_repo,) = _repos(world, world.repos, ["limited"])
    (b_repo,) = _repos(world, only_b, ["patient"])
    limit = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", {"retry-after": "0"})
    with ScriptedAPI({"rl-a": [limit, Turn.text("Done.")], "rl-b": [Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        world.write_policy(cli_max_retries=0, backoff_initial="25s", max_attempts=3, test_command="true")
        host_a = Host(world, "host-a", pg_url, [world.repos], 2.0, "3g", tmp_path).start()
        host_b = Host(world, "host-b", pg_url, [only_b], 2.0, "3g", tmp_path).start()
        store = Store(pg_url)
        try:
            host_a.submit("rl-a", a_repo, "rl-a: work")
            wait_for(lambda: store.rate_limits(job_id="rl-a"), 120, "host-a's 429")
            until = aware(store.runner_states()["scripted"].cooldown_until)
            host_b.submit("rl-b", b_repo, "rl-b: work")  # host-b is idle and holds this job's root alone
            wait_for(lambda: (s := host_b.status()) and any(r["runner"] == "scripted" and r["cooldown_until"]
                                                            for r in s["runners"]), 30, "host-b to see the cooldown")
            assert store.get("rl-b").status == Status.queued
            b = wait_status(store, "rl-b", SETTLED, timeout=180)
            a = wait_status(store, "rl-a", SETTLED, timeout=180)
            host_a.stop()
            host_b.stop()
        finally:
            for host in (host_a, host_b):
                if host.process and host.process.poll() is None:
                    host.kill()
            store.close()
        requests_b = [r for r in api.conversation if "rl-b" in r.first_user_text]
    assert (a.status, a.host_id, a.attempts) == (Status.succeeded, "host-a", 2), (a.reason, a.error)
    assert (b.status, b.host_id) == (Status.succeeded, "host-b"), (b.reason, b.error)
    assert aware(b.started_at) >= until  # host-b waited for the cooldown host-a's 429 started
    assert len(requests_b) == 1
