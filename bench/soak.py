"""Soak benchmark: N jobs of mixed kinds through ``executor serve`` while the machine fails on a schedule,
against the same run without faults.

Run by hand (as root, with the shared engine up and the sandbox image built on it, and PostgreSQL 15's
binaries installed; the machine's own engine is never restarted):

    .venv/bin/python bench/soak.py [--jobs 300] [--faults kill,engine,postgres] [--budget-cpus 2]
                                   [--no-baseline] [--keep]

Each run gets a throwaway world: a state root, policies and runners, one repository per job, a PostgreSQL
cluster of its own (tests/postgres.py), a scripted Messages API on loopback (tests/scripted_api.py, the
only fake), and ``executor serve`` as a process, on a private Docker engine (tests/engine.py: a second
``dockerd`` with the sandbox image copied in) so that the engine can be restarted. All N job files land in
the spool at once. The kinds, in turn:

- ``commit``: writes a file; tests check it; must succeed, applied once;
- ``fail``: writes a file; its tests fail; must be rolled back (``tests_failed``), the repository
  byte-identical to before;
- ``limited``: its runner's first answer is a 429 (the CLI does not retry: the executor's backoff does),
  then it writes a file; must succeed after waiting (at least two attempts);
- ``slow``: a tool call that sleeps ``--slow`` seconds, then writes; must succeed;
- ``reshape``: moves a directory, deletes a file, makes a deep new one, changes a mode; must succeed with
  exactly that tree.

Faults (``--faults``, in order, each when that share of the jobs has settled: with three, at 1/4, 2/4 and
3/4): ``kill`` (``kill -9`` of the executor's process group, then it starts again), ``engine`` (the private
engine restarted as ``systemctl restart docker`` does: its containers are stopped), ``postgres`` (a fast
restart of the database server: every session cut).

The verdict, per job: it ended exactly once (one terminal state event), with the outcome its kind must
have; a success applied exactly once (one ``committing`` event) with the right content; a rollback left the
repository byte-identical; no job ended ``internal``. After the run nothing of the executor's is left on
the engine. Figures: completion rate (jobs ended as their kind must / N), faults survived, jobs lost
(never settled within ``--timeout``), wall time from the first spool write until every job settled, and
the ratio against the fault-free run. Nothing here asserts: it prints, and exits 1 when a verdict fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from executor.intake.spool import Spool  # noqa: E402
from executor.sandbox.deployment import instance_id  # noqa: E402
from executor.store import TERMINAL, Status, Store  # noqa: E402
from tests.conftest import SANDBOX_IMAGE, chown_tree, tree_digest  # noqa: E402
from tests.engine import PrivateEngine  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402
from tests.scripted_api import ScriptedAPI, Turn  # noqa: E402

EXECUTOR = str(Path(sys.executable).parent / "executor")
TOKEN_VAR, TOKEN = "SOAK_RUNNER_TOKEN", "sk-soak-not-a-secret"
KINDS = ("commit", "fail", "limited", "slow", "reshape")
DONE = Turn.text("Done.")
TERMINAL_VALUES = {st.value for st in TERMINAL}


@dataclass
class SoakJob:
    id: str
    kind: str
    repo: Path
    before: str = ""  # the repository's digest before the run

    @property
    def key(self) -> str:
        return f"{self.id}: "  # the scripted API's key: the prompt starts with it

    def file(self) -> dict:
        spec = {"id": self.id, "runner": "limited" if self.kind == "limited" else "scripted",
                "workspace": str(self.repo), "prompt": f"{self.key}{self.kind} work", "test_command": TESTS[self.kind]}
        if self.kind == "limited":
            spec["policy"] = "limited"
        return spec


TESTS = {"commit": "test -f out.txt", "fail": "test -f never.txt", "limited": "test -f out.txt",
         "slow": "test -f slow.txt", "reshape": "test -d moved && ! test -e src && ! test -e doomed.txt"}


def script(job: SoakJob, slow: float) -> list[Turn]:
    write = Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": f"{job.id}\n"})
    if job.kind in ("commit", "fail", "limited"):
        return [write, DONE]
    if job.kind == "slow":
        return [Turn.tool("Bash", {"command": f"sleep {slow:g}; echo {job.id} > slow.txt", "description": "slow"}),
                DONE]
    reshape = ("mv src moved && rm doomed.txt && mkdir -p fresh/deep && "
               f"echo {job.id} > fresh/deep/new.txt && chmod 600 keep.txt")
    return [Turn.tool("Bash", {"command": reshape, "description": "reshape"}), DONE]


def expected(job: SoakJob) -> tuple[Status, str]:
    return (Status.rolled_back, "tests_failed") if job.kind == "fail" else (Status.succeeded, "committed")


def check_repo(job: SoakJob) -> str | None:
    """Why the repository is not what the job's kind must leave, or None."""
    repo = job.repo
    if job.kind == "fail":
        return None if tree_digest(repo) == job.before else "the rolled-back repository changed"
    if job.kind in ("commit", "limited"):
        return None if (repo / "out.txt").read_text() == f"{job.id}\n" else "out.txt is wrong"
    if job.kind == "slow":
        return None if (repo / "slow.txt").read_text() == f"{job.id}\n" else "slow.txt is wrong"
    moved = {p.name: p.read_text() for p in (repo / "moved").iterdir()}
    if moved != {"a.txt": "a\n", "b.txt": "b\n"} or (repo / "src").exists() or (repo / "doomed.txt").exists():
        return "the reshaped tree is wrong"
    if (repo / "fresh" / "deep" / "new.txt").read_text() != f"{job.id}\n":
        return "fresh/deep/new.txt is wrong"
    return None if stat.S_IMODE((repo / "keep.txt").stat().st_mode) == 0o600 else "keep.txt's mode is wrong"


# ------------------------------------------------------------------------------------------------ a world


def plan(root: Path, n: int) -> list[SoakJob]:
    """N jobs, the kinds in turn, one repository each (made by ``make_world``)."""
    return [SoakJob(f"soak-{i:05d}-{KINDS[i % len(KINDS)]}", KINDS[i % len(KINDS)], root / "repos" / f"r{i:05d}")
            for i in range(n)]


def make_world(root: Path, jobs: list[SoakJob], api_url: str) -> None:
    home, policies, repos = root / "home", root / "policies", root / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    base = textwrap.dedent("""
        cpus = 0.25
        memory = "256m"
        pids = 256
        timeout = "10m"
        network = "sealed"
        test_timeout = "2m"
        heartbeat_interval = "2s"
        stall_after = "300s"
    """)
    (policies / "default.toml").write_text(base)
    (policies / "limited.toml").write_text(base + 'cli_max_retries = 0\nbackoff_initial = "2s"\nmax_attempts = 6\n')
    runners = "".join(f'[runners.{name}]\nmodel = "claude-sonnet-4-5"\nauth_env = "{TOKEN_VAR}"\n'
                      f'base_url = "{api_url}"\n' for name in ("scripted", "limited"))
    (policies / "runners.toml").write_text(runners)
    for job in jobs:
        job.repo.mkdir()
        (job.repo / "README").write_text(f"repository of {job.id}\n")
        if job.kind == "reshape":
            (job.repo / "src").mkdir()
            (job.repo / "src" / "a.txt").write_text("a\n")
            (job.repo / "src" / "b.txt").write_text("b\n")
            (job.repo / "doomed.txt").write_text("doomed\n")
            (job.repo / "keep.txt").write_text("keep\n")
    chown_tree(repos)
    for job in jobs:
        job.before = tree_digest(job.repo)


@dataclass
class Run:
    name: str
    root: Path
    engine: PrivateEngine
    faults: list[str]
    budget_cpus: float
    slow: float
    timeout: float
    cluster: PostgresCluster = field(default_factory=PostgresCluster)
    process: subprocess.Popen | None = None
    log: Path | None = None
    fault_log: list[dict] = field(default_factory=list)

    def env(self, url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
        env.update({"EXECUTOR_HOME": str(self.root / "home"), "EXECUTOR_POLICIES": str(self.root / "policies"),
                    "EXECUTOR_WORKSPACE_ROOTS": str(self.root / "repos"), "EXECUTOR_SANDBOX_IMAGE": SANDBOX_IMAGE,
                    "EXECUTOR_DATABASE_URL": url, "EXECUTOR_HOST_ID": "soak", "DOCKER_HOST": self.engine.host,
                    "EXECUTOR_BUDGET_CPUS": str(self.budget_cpus), "EXECUTOR_BUDGET_MEMORY": "6g",
                    "EXECUTOR_POLL_INTERVAL": "0.2", "EXECUTOR_RESULT_GRACE": "5", "EXECUTOR_DISK_RESERVE": "1g",
                    "EXECUTOR_HOST_HEARTBEAT": "2", "EXECUTOR_HOST_TIMEOUT": "30", TOKEN_VAR: TOKEN})
        return env

    def serve(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen([EXECUTOR, "serve"], env=env, stdout=subprocess.DEVNULL,
                                        stderr=self.log.open("ab"), start_new_session=True)

    def inject(self, fault: str, env: dict[str, str]) -> None:
        started = time.monotonic()
        if fault == "kill":
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
            time.sleep(2)  # a supervisor restarts it
            self.serve(env)
        elif fault == "engine":
            self.engine.restart()
        elif fault == "postgres":
            self.cluster.restart()
        self.fault_log.append({"fault": fault, "seconds": round(time.monotonic() - started, 1)})

    def go(self, n: int) -> dict:
        self.cluster.start()
        url = self.cluster.create_database()
        Store(url).close()  # the schema, before the executor and the watcher
        env = self.env(url)
        self.log = self.root / "serve.log"
        results: dict = {}
        jobs = plan(self.root, n)
        limit = Turn.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                           {"retry-after": "1"})
        with ScriptedAPI({job.key: script(job, self.slow) for job in jobs}, replay=True,
                         first={job.key: limit for job in jobs if job.kind == "limited"}) as api:
            make_world(self.root, jobs, api.base_url)
            store = Store(url)
            self.serve(env)
            spool = Spool(self.root / "home" / "spool")
            started = time.monotonic()
            for job in jobs:
                spool.write(json.dumps(job.file()).encode())
            schedule = [(int(n * (i + 1) / (len(self.faults) + 1)), fault) for i, fault in enumerate(self.faults)]
            settled = 0
            deadline = started + self.timeout
            while time.monotonic() < deadline:
                try:
                    counts = store.counts()
                except Exception:  # noqa: BLE001 - the database restarting under the watcher
                    time.sleep(1)
                    continue
                settled = sum(v for st, v in counts.items() if st.value in TERMINAL_VALUES)
                while schedule and settled >= schedule[0][0]:
                    _, fault = schedule.pop(0)
                    print(f"  [{self.name}] {settled}/{n} settled: fault {fault}", flush=True)
                    self.inject(fault, env)
                    self.fault_log[-1]["at_settled"] = settled
                if settled >= n:
                    break
                time.sleep(1)
            wall = time.monotonic() - started
            self.process.send_signal(signal.SIGTERM)
            try:
                clean_stop = self.process.wait(timeout=180) == 0
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                clean_stop = False
            results = self.verdict(store, jobs, wall, clean_stop)
            store.close()
        self.cluster.stop()
        return results

    def verdict(self, store: Store, jobs: list[SoakJob], wall: float, clean_stop: bool) -> dict:
        wrong: list[str] = []
        lost = 0
        by_kind: Counter = Counter()
        attempts: Counter = Counter()
        for job in jobs:
            row = store.get(job.id)
            if row is None or not row.status.terminal:
                lost += 1
                wrong.append(f"{job.id}: never settled ({row.status.value if row else 'not in the store'})")
                continue
            events = store.events(job_id=job.id)
            states = [e.data for e in events if e.kind == "state"]
            endings = [s for s in states if s.get("status") in TERMINAL_VALUES]
            committing = [s for s in states if s.get("status") == "committing"]
            status, reason = expected(job)
            problems = []
            if len(endings) != 1:
                problems.append(f"ended {len(endings)} times")
            if (row.status, row.reason) != (status, reason):
                problems.append(f"ended {row.status.value}/{row.reason} ({row.error}), not {status.value}/{reason}")
            if len(committing) != (1 if status == Status.succeeded else 0):
                problems.append(f"applied {len(committing)} times")
            if any(s.get("reason") == "internal" for s in states):
                problems.append("an attempt ended internal")
            if job.kind == "limited" and row.attempts < 2:
                problems.append("its rate limit was never met")
            if not problems and (why := check_repo(job)):
                problems.append(why)
            if problems:
                wrong.append(f"{job.id}: " + "; ".join(problems))
            else:
                by_kind[job.kind] += 1
            attempts[row.attempts] += 1
        prefix = f"executor-{instance_id((self.root / 'home').absolute())}-"
        client = self.engine.client()
        leftovers = [c.name for c in client.containers.list(all=True) if c.name.startswith(prefix)] + \
                    [v.name for v in client.volumes.list() if v.name.startswith(prefix)]
        client.close()
        n = len(jobs)
        return {"run": self.name, "jobs": n, "faults": self.fault_log, "wall_seconds": round(wall, 1),
                "completion_rate": round(sum(by_kind.values()) / n, 4), "as_expected_by_kind": dict(by_kind),
                "lost": lost, "wrong": wrong[:50], "wrong_count": len(wrong), "leftovers": leftovers,
                "attempts": dict(sorted(attempts.items())), "clean_stop": clean_stop,
                "ok": not wrong and not leftovers and clean_stop}


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--faults", default="kill,engine,postgres", help="comma-separated: kill, engine, postgres")
    parser.add_argument("--budget-cpus", type=float, default=2.0, help="0.25 cpu per job: 8 at once with 2")
    parser.add_argument("--slow", type=float, default=8.0, help="seconds a slow job's tool call sleeps")
    parser.add_argument("--timeout", type=float, default=None, help="seconds a run may take (default 20 s a job)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without faults")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories (logs) under /tmp")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - {"kill", "engine", "postgres"}
    if unknown:
        parser.error(f"unknown fault {', '.join(sorted(unknown))}: choose among kill, engine, postgres")
    timeout = args.timeout or 600 + 20 * args.jobs
    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    engine = PrivateEngine().start()
    print(f"private engine at {engine.host}; copying {SANDBOX_IMAGE} into it", flush=True)
    engine.load_image(SANDBOX_IMAGE)
    results = []
    try:
        plans = [("faults", faults)] + ([] if args.no_baseline else [("baseline", [])])
        for name, plan in plans:
            print(f"run {name}: {args.jobs} jobs, faults {plan or 'none'}", flush=True)
            run = Run(name, root / name, engine, plan, args.budget_cpus, args.slow, timeout)
            results.append(run.go(args.jobs))
            print(json.dumps(results[-1], indent=2), flush=True)
    finally:
        engine.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    summary(results)
    return 0 if all(r["ok"] for r in results) else 1


def summary(results: list[dict]) -> None:
    faulted = results[0]
    print("\nsoak verdict")
    for r in results:
        print(f"  {r['run']:9} {r['jobs']} jobs in {r['wall_seconds']:.0f} s: {r['completion_rate']:.1%} ended as "
              f"their kind must, {r['lost']} lost, {r['wrong_count']} wrong, {len(r['leftovers'])} objects left "
              f"on the engine; faults survived {len(r['faults'])}; attempts {r['attempts']}")
    if len(results) > 1 and results[1]["wall_seconds"]:
        print(f"  wall time with faults / without: {faulted['wall_seconds'] / results[1]['wall_seconds']:.2f}x "
              "(goal within 1.2x)")


if __name__ == "__main__":
    sys.exit(main())
