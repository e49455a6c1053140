"""The governor on the real engine: the budget holds by construction, stalls are noticed and acted on,
limits are reported for what they are. Intervals are set short through the policy."""

from __future__ import annotations

import json
import threading

import docker

from executor.sandbox.deployment import instance_id
from executor.store import Status
from tests.conftest import tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}



class EngineSampler:
    """Asks the Engine (not the executor) which job containers run, every 50 ms."""

    def __init__(self, settings) -> None:
        self.client = docker.from_env()
        # only this test's executor: other test sessions may share the engine
        self.label = f"io.executor.instance={instance_id(settings.home)}"
        self.max_count = 0
        self.max_nano_cpus = 0
        self.max_memory = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            containers = self.client.containers.list(filters={"label": self.label, "status": "running"},
                                                     ignore_removed=True)
            nano = mem = 0
            for c in containers:
                try:
                    host = c.attrs["HostConfig"]
                except KeyError:
                    continue
                nano += host.get("NanoCpus") or 0
                mem += host.get("Memory") or 0
            self.max_count = max(self.max_count, len(containers))
            self.max_nano_cpus = max(self.max_nano_cpus, nano)
            self.max_memory = max(self.max_memory, mem)
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> EngineSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_admission_never_exceeds_the_budget(world, run_executor):
    """2-cpu budget, 1-cpu jobs, 5 queued: never more than two job containers, all five finish."""
    script = {f"adm-{i}": [Turn.tool("Bash", {"command": "sleep 2; echo ok > done.txt", "description": "work"}),
                           Turn.text("Done.")] for i in range(5)}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=1.0, memory="1g", test_command="test -f done.txt")
        settings = world.settings(budget_cpus=2.0, budget_memory="3g", reserve_memory="256m")
        repos = [world.repo(f"r{i}") for i in range(5)]
        with EngineSampler(settings) as sampler:
            runner = run_executor(settings)
            ids = [world.submit(id=f"adm-{i}", workspace=str(repos[i]), prompt=f"adm-{i}: work") for i in range(5)]
            store = runner.executor.store
            for job_id in ids:
                job = wait_status(store, job_id, SETTLED, timeout=240)
                assert job.status == Status.succeeded, (job.reason, job.error)
    assert sampler.samples > 20
    assert sampler.max_count == 2  # the budget was used and never exceeded
    assert sampler.max_nano_cpus <= 2 * 10**9
    assert sampler.max_memory + settings.reserve_memory <= settings.budget_memory
    for repo in repos:
        assert (repo / "done.txt").read_text() == "ok\n"


def test_head_of_queue_is_not_overtaken(world, run_executor):
    """A 2-cpu job at the head waits for the budget; a 1-cpu job behind it does not start before it."""
    script = {"first": [Turn.tool("Bash", {"command": "sleep 3", "description": "w"}), Turn.text("Done.")],
              "big": [Turn.text("Done.")], "small": [Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=1.0, memory="512m")
        world.write_policy("big", cpus=2.0, memory="512m", network="host", test_command="true")
        settings = world.settings(budget_cpus=2.0, budget_memory="4g")
        running = run_executor(settings)
        store = running.executor.store
        world.submit(id="first", workspace=str(world.repo("a")), prompt="first")
        wait_status(store, "first", Status.running, timeout=60)
        world.submit(id="big", workspace=str(world.repo("b")), prompt="big", policy="big", priority=5)
        wait_for(lambda: store.get("big"), 30, "intake to take 'big' before 'small' arrives")
        world.submit(id="small", workspace=str(world.repo("c")), prompt="small")
        wait_for(lambda: running.executor.waiting, 30, "the head of the queue to wait")
        assert "big" in running.executor.waiting and "cpus" in running.executor.waiting
        status = json.loads((world.home / "status.json").read_text())
        assert status["budget"]["cpus"] == 2.0 and status["queue_length"] >= 1
        for job_id in ("first", "big", "small"):
            assert wait_status(store, job_id, SETTLED, timeout=120).status == Status.succeeded
    big, small = store.get("big"), store.get("small")
    assert big.started_at <= small.started_at


def test_silent_job_is_stalled_killed_and_its_slot_freed(world, run_executor, docker_client):
    script = {"silent": [Turn.tool("Bash", {"command": "echo partial > partial.txt", "description": "write"}),
                         Turn.hang()],
              "next": [Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=1.0, heartbeat_interval="1s", stall_after="6s", timeout="5m")
        repo = world.repo("silent")
        before = tree_digest(repo)
        running = run_executor(world.settings(budget_cpus=1.0))
        store = running.executor.store
        world.submit(id="silent", workspace=str(repo), prompt="silent: then hang")
        world.submit(id="next", workspace=str(world.repo("next")), prompt="next: quick")
        job = wait_status(store, "silent", SETTLED, timeout=120)
        assert job.status == Status.stalled, (job.reason, job.error)
        assert "last activity" in job.error and "Bash" in job.error
        assert docker_client.containers.list(all=True, filters={"label": "io.executor.job=silent"}) == []
        assert wait_status(store, "next", SETTLED, timeout=60).status == Status.succeeded
    assert tree_digest(repo) == before
    beats = store.heartbeats("silent")
    assert len(beats) >= 3 and beats[-1].state == "idle"
    assert beats[-1].cpu_cores is not None and beats[-1].cpu_cores < 0.05
    state_events = [e.data for e in store.events(job_id="silent") if e.kind == "state"]
    assert state_events[-1]["status"] == "stalled" and "last alive at" in state_events[-1]["error"]


def test_slow_but_steady_stream_is_not_stalled(world, run_executor):
    script = {"steady": [Turn.slow_text("thinking it through slowly, step by step. Done.", chunks=8, interval=1.5)]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(heartbeat_interval="1s", stall_after="5s")
        running = run_executor(world.settings())
        world.submit(id="steady", workspace=str(world.repo("steady")), prompt="steady: talk slowly")
        job = wait_status(running.executor.store, "steady", SETTLED, timeout=120)
    assert job.status == Status.succeeded, (job.reason, job.error)
    started, finished = job.started_at, job.finished_at
    assert (finished - started).total_seconds() > 5  # it really ran longer than stall_after


def test_wall_clock_timeout_fails_and_rolls_back(world, run_executor):
    script = {"slow": [Turn.tool("Bash", {"command": "echo x > x.txt", "description": "w"}), Turn.hang()]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(timeout="6s", stall_after="5m")
        repo = world.repo("slow")
        before = tree_digest(repo)
        running = run_executor(world.settings())
        world.submit(id="slow", workspace=str(repo), prompt="slow: hang")
        job = wait_status(running.executor.store, "slow", SETTLED, timeout=120)
    assert (job.status, job.reason) == (Status.failed, "timeout")
    assert tree_digest(repo) == before


def test_memory_hog_is_reported_as_out_of_memory(world, run_executor):
    hog = "python3 -c \"b = b'x' * (1536 * 1024 * 1024); print(len(b))\""
    script = {"hog": [Turn.tool("Bash", {"command": hog, "description": "allocate"}), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(memory="768m")
        repo = world.repo("hog")
        before = tree_digest(repo)
        running = run_executor(world.settings())
        world.submit(id="hog", workspace=str(repo), prompt="hog: eat memory")
        job = wait_status(running.executor.store, "hog", SETTLED, timeout=180)
    assert (job.status, job.reason) == (Status.failed, "out_of_memory"), job.error
    assert "768m" in job.error
    assert tree_digest(repo) == before


#: Forks until refused, each child sleeping 4 s, then reaps them (test_runsc.py runs it under gVisor too).
FORK_BOMB = ("python3 -c \"\nimport os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
             "            time.sleep(4); os._exit(0)\n        n += 1\nexcept OSError as e:\n"
             "    print('fork failed after', n, e)\n"
             "while True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        break\n\"")


def test_fork_bomb_is_contained_and_reported(world, run_executor):
    script = {"bomb": [Turn.tool("Bash", {"command": FORK_BOMB, "description": "fork"}), Turn.text("Done.")],
              "neighbour": [Turn.tool("Bash", {"command": "sleep 3; echo fine > n.txt", "description": "w"}),
                            Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(pids=64, heartbeat_interval="1s", test_command="true")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="bomb", workspace=str(world.repo("bomb")), prompt="bomb: fork")
        world.submit(id="neighbour", workspace=str(world.repo("neighbour")), prompt="neighbour: work")
        bomb = wait_status(store, "bomb", SETTLED, timeout=180)
        neighbour = wait_status(store, "neighbour", SETTLED, timeout=180)
    assert neighbour.status == Status.succeeded, (neighbour.reason, neighbour.error)  # the other job kept running
    reports = [e.data for e in store.events(job_id="bomb") if e.kind == "pids_limit"]
    assert reports and reports[-1]["limit"] == 64  # the limit stopped it, and the log says so
    # The bomb shares the limit with the CLI: either the CLI survived (the Bash call saw its forks
    # refused) or it died of it too, and then the job's error names the pids limit.
    if bomb.status == Status.succeeded:
        results = [e.data.get("content", "") for e in store.events(job_id="bomb") if e.kind == "tool_result"]
        assert any("fork failed after" in r for r in results), results
    else:
        assert bomb.status == Status.rolled_back and "pids limit of 64" in bomb.error, bomb.error


def test_startup_sweeps_leftover_containers_and_volumes(world, run_executor, docker_client):
    settings = world.settings()
    labels = {"io.executor": "1", "io.executor.job": "ghost", "io.executor.instance": instance_id(settings.home)}
    stray = docker_client.containers.create("executor-sandbox:latest", "true", network_mode="none", labels=labels)
    volume = docker_client.volumes.create(f"executor-ghost-{instance_id(settings.home)}", labels=labels)
    foreign = docker_client.containers.create(  # another executor's (another state root): not ours to sweep
        "executor-sandbox:latest", "true", network_mode="none",
        labels={**labels, "io.executor.instance": "someone-else"})
    running = run_executor(settings)
    wait_for(lambda: (world.home / "status.json").exists(), 30, "the first tick")
    names = [c.name for c in docker_client.containers.list(all=True, filters={"label": "io.executor=1"})]
    assert stray.name not in names
    assert volume.name not in [v.name for v in docker_client.volumes.list(filters={"label": "io.executor=1"})]
    assert foreign.name in names
    foreign.remove(force=True)
    assert running.executor.store.jobs() == []


def test_stalled_job_is_retried_from_the_clean_repository_when_the_policy_says_so(world, run_executor):
    script = {"again": [Turn.tool("Bash", {"command": "echo stale > stale.txt", "description": "w"}), Turn.hang(),
                        Turn.tool("Write", {"file_path": "/workspace/fresh.txt", "content": "fresh\n"}),
                        Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(heartbeat_interval="1s", stall_after="5s", retry_stalled=True, test_command="test -f fresh.txt")
        repo = world.repo("again")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="again", workspace=str(repo), prompt="again: stall once")
        job = wait_status(store, "again", SETTLED, timeout=180)
    assert job.status == Status.succeeded and job.attempts == 2, (job.reason, job.error)
    assert (repo / "fresh.txt").read_text() == "fresh\n"
    assert not (repo / "stale.txt").exists()  # the stalled attempt's work was discarded, not resumed
    stalls = [e.data for e in store.events(job_id="again") if e.kind == "state" and e.data.get("reason") == "stalled"]
    assert stalls and "re-queued" in stalls[0]["error"]


def test_kept_upper_dirs_are_removed_after_the_retention_period(world):
    from datetime import timedelta

    from executor.clock import utcnow
    from executor.store import Job
    from executor.transaction.retention import remove_expired

    settings = world.settings(retention="1h")
    store = world.store()
    jobs_dir = world.home / "jobs"
    for job_id, reason, age in (("old-conflict", "conflict", 2), ("new-conflict", "conflict", 0.5),
                                ("done", "committed", 0)):
        store.add_job(Job(id=job_id, session_id=job_id, runner="scripted", model_requested="m",
                          workspace="/nowhere", prompt="p", policy_name="default"))
        store.transition(job_id, Status.queued, Status.running)
        store.transition(job_id, Status.running, Status.failed, reason=reason,
                         finished_at=utcnow() - timedelta(hours=age))
        (jobs_dir / job_id / "layers" / "upper").mkdir(parents=True)
    remove_expired(settings, store)
    assert sorted(p.name for p in jobs_dir.iterdir()) == ["new-conflict"]
