"""Benchmark: how fast the executor answers and how much time it adds to a job.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    .venv/bin/python bench/latency.py [--jobs 100000] [--pairs 8] [--stores sqlite,postgres] [--reads-only]

* read commands: ``executor --help``, ``status``, ``jobs`` and ``show ID`` as subprocesses, against a store
  holding N jobs (the SQLite file of the state root, or a PostgreSQL 15 database of its own cluster,
  tests/postgres.py) while an idle executor serves it (medians and maxima of 10 calls each);
* a trivial job end to end: the time from a job file landing in the spool to the job committed, against the
  same two containers (the agent on an overlay of the repository with its session home on an overlay of
  its own, then the tests on a layer above the change, then the volumes removed) run by hand through the
  same engine calls, without the control plane, which also applies the change and records each step;
  paired runs, medians.

Nothing here asserts on timing; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXECUTOR = str(Path(sys.executable).parent / "executor")
IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")
UID = GID = 1000


def log(message: str) -> None:
    print(f"[latency] {message}", file=sys.stderr, flush=True)


def rows(n: int) -> list[tuple]:
    start = datetime(2026, 11, 1, 10, 0, 0)
    # Distinct creation times, a second apart, as a real history has: the jobs table sorts on them.
    return [(f"job-{i:06d}", f"s{i % 1000}", "sonnet", "m", "/w", "p" * 200, "default", "{}", 0,
             "succeeded" if i % 3 else "failed", "committed", start + timedelta(seconds=i), 1, False, 0)
            for i in range(n)]


COLUMNS = ("id, session_id, runner, model_requested, workspace, prompt, policy_name, policy, priority, status, "
           "reason, created_at, attempts, cancel_requested, limited_attempts")


def fill(db: Path, n: int) -> None:
    """N settled jobs, written straight into the tables the store made (the fastest honest way)."""
    from executor.store import Store

    Store(db).close()
    conn = sqlite3.connect(db)
    conn.executemany(f"INSERT INTO job ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(*r[:11], r[11].strftime("%Y-%m-%d %H:%M:%S.%f"), r[12], int(r[13]), r[14]) for r in rows(n)])
    conn.commit()
    conn.close()


def fill_postgres(url: str, n: int) -> None:
    """The same N jobs in a PostgreSQL store (COPY into the table the store made)."""
    import psycopg

    from executor.store import Store
    from executor.store.engine import libpq_dsn

    Store(url).close()
    with psycopg.connect(libpq_dsn(url)) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY job ({COLUMNS}) FROM STDIN") as copy:
            for row in rows(n):
                copy.write_row(row)
        cur.execute("ANALYZE job")


def timed(args: list[str], env: dict) -> tuple[float, float]:
    """Wall-clock seconds of ``executor ARGS`` as a subprocess, and the CPU seconds it used (user + system: on a
    loaded machine the wall clock measures the others' work too, the CPU time only this command's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([EXECUTOR, *args], env=env, capture_output=True)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"executor {' '.join(args)}: {done.stderr.decode()[-500:]}")
    return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def world(base: Path) -> tuple[Path, Path, Path]:
    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    os.chmod(base, 0o755)
    return home, policies, repos


def serve(settings, secrets: dict) -> tuple:
    import docker

    from executor.scheduling.service import Executor

    executor = Executor(settings, secrets, docker.from_env(timeout=120))
    stop = threading.Event()
    thread = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
    thread.start()
    while not settings.status_path.exists():
        time.sleep(0.05)
    return executor, stop, thread


def read_commands(base: Path, n: int, url: str | None = None) -> dict[str, list[tuple[float, float]]]:
    from executor.settings import Settings

    home, policies, repos = world(base)
    (policies / "runners.toml").write_text('[runners.sonnet]\nmodel = "m"\nauth_env = "T"\n')
    (policies / "default.toml").write_text("")
    log(f"filling a {'PostgreSQL' if url else 'SQLite'} store with {n:,} jobs")
    if url:
        fill_postgres(url, n)
    else:
        fill(home / "executor.db", n)
    settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                        database_url=url)
    executor, stop, thread = serve(settings, {"T": "x" * 16})
    env = {**os.environ, "EXECUTOR_HOME": str(home), "EXECUTOR_POLICIES": str(policies),
           "EXECUTOR_WORKSPACE_ROOTS": str(repos)}
    if url:
        env["EXECUTOR_DATABASE_URL"] = url
    try:
        time.sleep(1)
        return {name: [timed(args, env) for _ in range(10)] for name, args in (
            ("--help", ["--help"]), ("status", ["status"]), ("jobs", ["jobs"]),
            ("show ID", ["show", f"job-{n // 2:06d}"]))}
    finally:
        stop.set()
        thread.join(timeout=60)


def reads_on(store: str, base: Path, n: int) -> dict[str, list[tuple[float, float]]]:
    if store == "sqlite":
        return read_commands(base, n)
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster(fast=False).start()
    try:
        return read_commands(base, n, cluster.create_database())
    finally:
        cluster.stop()


def trivial_job(base: Path, pairs: int) -> tuple[list[float], list[float]]:
    import docker

    from executor.agent.registry import agent_for
    from executor.agent.seam import LaunchRequest
    from executor.intake.spool import Spool
    from executor.policy import Policy, Runner
    from executor.sandbox.deployment import Sandbox
    from executor.sandbox.runtime import agent_spec, run_tests
    from executor.settings import Settings
    from executor.store import TERMINAL
    from executor.transaction import workspace
    from executor.transaction.workspace import Workspace
    from tests.scripted_api import ScriptedAPI, Turn

    home, policies, repos = world(base)
    answer = [Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hi\n"}), Turn.text("Done.")]
    with ScriptedAPI({f"e{i}": list(answer) for i in range(pairs)} | {f"h{i}": list(answer) for i in range(pairs)}) as api:
        (policies / "runners.toml").write_text(f'[runners.r]\nmodel = "claude-sonnet-4-5"\nauth_env = "T"\n'
                                               f'base_url = "{api.base_url}"\n')
        (policies / "default.toml").write_text('network = "host"\ntest_command = "test -f hello.txt"\n'
                                               'review = "never"\n')
        settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                            result_grace=5.0)
        executor, stop, thread = serve(settings, {"T": "sk-bench-0000"})
        client = docker.from_env(timeout=120)
        sandbox = Sandbox(client, IMAGE, "bench-by-hand")
        runner = Runner(name="r", model="claude-sonnet-4-5", auth_env="T", base_url=api.base_url)
        policy = Policy(network="host", test_command="test -f hello.txt")
        spool = Spool(home / "spool")
        # Watched with one plain query on the executor's database: the ORM's read, every few milliseconds,
        # would take CPU from the agent's container (two cores here) and slow what it measures.
        watch = sqlite3.connect(settings.db_path, isolation_level=None)
        terminal = {status.value for status in TERMINAL}
        by_executor, by_hand = [], []
        try:
            for i in range(pairs):
                for kind in ("hand", "exec"):
                    repo = repos / f"{kind}{i}"
                    repo.mkdir()
                    (repo / "README.md").write_text("r\n")
                    for p in (repo, repo / "README.md"):
                        os.chown(p, UID, GID)
                time.sleep(0.05)
                # by hand: the same two containers, through the same engine calls
                # with a fresh session home below the agent's home, as the executor mounts for a new session
                ws = Workspace(job_id=f"hand{i}", attempt=1, repo=repos / f"hand{i}", root=base / "hand" / str(i),
                               uid=UID, gid=GID, home=base / "hand-sessions" / str(i))
                started = time.perf_counter()
                workspace.create(sandbox, ws)
                launch = agent_for(runner).launch(LaunchRequest(f"h{i}: write hello.txt", runner, policy,
                                                                {"T": "sk-bench-0000"}, sealed=False))
                spec = agent_spec(ws, policy, launch)
                container = sandbox.start(spec)
                container.wait()
                sandbox.remove(container)
                workspace.create_test_view(sandbox, ws)
                tests = run_tests(sandbox, ws, "test -f hello.txt", policy, should_stop=lambda: None)
                workspace.discard_test_view(sandbox, ws)
                workspace.discard(sandbox, ws)  # by hand one removes the volumes too (the executor's settle does)
                by_hand.append(time.perf_counter() - started)
                if tests.exit_code != 0:
                    raise RuntimeError(f"by hand: the tests failed: {tests.output_tail}")
                # through the executor: from the file landing in the spool to the job committed
                started = time.perf_counter()
                spool.write(json.dumps({"id": f"e{i}", "runner": "r", "workspace": str(repos / f"exec{i}"),
                                        "prompt": f"e{i}: write hello.txt"}).encode())
                while _status(watch, f"e{i}") not in terminal:
                    time.sleep(0.005)
                by_executor.append(time.perf_counter() - started)
                job = executor.store.get(f"e{i}")
                if job.status.value != "succeeded":
                    raise RuntimeError(f"e{i} {job.status.value}: {job.error}")
        finally:
            stop.set()
            thread.join(timeout=120)
    return by_executor, by_hand


def _status(db: sqlite3.Connection, job_id: str) -> str | None:
    row = db.execute("SELECT status FROM job WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--reads-only", action="store_true", help="only the read commands")
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-latency-", dir=args.dir))
    from executor.transaction.safefs import remove_tree

    by_executor = by_hand = None
    try:
        reads = {store: reads_on(store, base / f"reads-{store}", args.jobs) for store in args.stores.split(",")}
        if not args.reads_only:
            log(f"{args.pairs} paired trivial jobs")
            by_executor, by_hand = trivial_job(base / "jobs", args.pairs)
    finally:
        remove_tree(base)
    for store, figures in reads.items():
        print(f"\nread commands against {args.jobs:,} jobs on {store}, an idle executor serving (10 calls each):")
        for name, calls in figures.items():
            wall, cpu = [w for w, _ in calls], [c for _, c in calls]
            print(f"  executor {name:10} median {statistics.median(wall) * 1000:4.0f} ms   "
                  f"max {max(wall) * 1000:4.0f} ms   cpu median {statistics.median(cpu) * 1000:4.0f} ms")
    if by_executor is None or by_hand is None:
        return 0
    hand, ex = statistics.median(by_hand), statistics.median(by_executor)
    print(f"\na trivial job ({args.pairs} pairs): spool to committed median {ex:.2f} s; the same containers by hand "
          f"median {hand:.2f} s; the control plane adds {ex - hand:+.2f} s ({(ex / hand - 1) * 100:+.0f} %)")
    print("  by hand:  " + " ".join(f"{t:.2f}" for t in by_hand))
    print("  executor: " + " ".join(f"{t:.2f}" for t in by_executor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
