"""Benchmark: the store under load, on SQLite and on PostgreSQL.

Run by hand, as root (PostgreSQL 15 from Debian's package; no Docker needed):

    .venv/bin/python bench/load.py [--files 10000] [--jobs 100000] [--claims 600] [--engines sqlite,postgresql]

For each engine, in a fresh store:

* intake: 10,000 job files dropped into one host's spool at once and taken by ``intake`` in the serving
  loop's slices (0.25 s each): files per second; every file accepted exactly once, none rejected or left;
* 100,000 jobs in the store (the rest added in bulk), then the latency of ``executor status --json`` (the
  serving loop's snapshot: the path used while ``serve`` runs), of ``executor jobs`` (the default listing, the
  first 1,000 in admission order) and of ``executor jobs --status running``, each as a whole process (Python
  start-up included) and as the query alone in this process; and the serving loop's own per-tick figures
  (``Store.counts``);
* claims with three hosts: three processes, each with its own connection pool, claiming from the same
  queue as fast as they can (``Store.claim``; each claimed job is then settled, freeing its workspace):
  latency p50/p95/max and claims per second, and that no job was claimed twice.

PostgreSQL runs in a cluster of its own in /tmp with its durable defaults (fsync on). Nothing here
asserts on timing; it prints figures (and fails loudly if a job was lost or duplicated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from executor.intake.spool import Spool, intake  # noqa: E402
from executor.policy import load_runners  # noqa: E402
from executor.scheduling import snapshot  # noqa: E402
from executor.settings import Settings  # noqa: E402
from executor.store import Job, Status, Store  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402

EXECUTOR = str(Path(sys.executable).parent / "executor")
UID = 1000


def log(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


def world(base: Path) -> tuple[Path, Path, Path]:
    policies, repos = base / "policies", base / "repos"
    policies.mkdir(parents=True)
    (policies / "default.toml").write_text('cpus = 0.25\nmemory = "256m"\ntest_command = "true"\n')
    (policies / "runners.toml").write_text('[runners.scripted]\nmodel = "claude-sonnet-4-5"\nauth_env = "T"\n')
    repo = repos / "app"
    repo.mkdir(parents=True)
    for path in (repos, repo):
        os.chown(path, UID, UID)
    return policies, repos, repo


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] * 1000  # noqa: E731
    return f"p50 {p(0.5):.1f} ms, p95 {p(0.95):.1f} ms, max {ordered[-1] * 1000:.1f} ms"


def bench_intake(settings: Settings, store: Store, repo: Path, files: int) -> dict:
    spool = Spool(settings.spool_dir)
    for i in range(files):
        spool.write(json.dumps({"id": f"in-{i:05d}", "runner": "scripted", "workspace": str(repo),
                                "prompt": f"job {i}"}).encode())
    runners = load_runners(settings.policies)
    started, slices, accepted = time.monotonic(), 0, 0
    while True:
        result = intake(spool, store, settings, runners, budget=0.25)
        slices += 1
        accepted += len(result.accepted)
        assert not result.rejected, result.rejected[:3]
        if not result.more:
            break
    elapsed = time.monotonic() - started
    stored = sum(1 for _ in store.job_list(limit=None))
    assert accepted == files == stored, (accepted, files, stored)
    assert len(os.listdir(spool.accepted)) == files and not spool.pending()
    return {"files": files, "seconds": round(elapsed, 2), "per_second": round(files / elapsed), "slices": slices}


def fill(store: Store, total: int, base: str) -> float:
    started = time.monotonic()
    have = sum(1 for _ in store.job_list(limit=None))
    batch = []
    for i in range(have, total):
        batch.append(Job(id=f"bulk-{i:06d}", session_id=f"bulk-{i:06d}", runner="scripted",
                         model_requested="claude-sonnet-4-5", workspace=f"{base}/w{i % 5000}", prompt=f"bulk {i}",
                         policy_name="default", policy={"cpus": 0.25, "memory": 256 * 2**20}))
        if len(batch) == 2000:
            assert store.add_jobs(batch) == {}
            batch = []
    if batch:
        assert store.add_jobs(batch) == {}
    return time.monotonic() - started


def timed_runs(command: list[str], env: dict, runs: int = 7) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, timeout=300)
        times.append(time.monotonic() - started)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    return times


def bench_cli(settings: Settings, store: Store, env: dict) -> dict:
    counts = {st.value: n for st, n in store.counts().items()}
    snapshot.write(settings.status_path, {  # what the serving loop writes each tick (figures from the store)
        "ts": time.time(), "pid": os.getpid(), "poll_interval": 0.5, "host": settings.host_id, "hosts": [],
        "budget": {"cpus": 4.0, "memory": 8 * 2**30, "reserve_memory": 2**28},
        "reserved": {"cpus": 0.0, "memory": 2**28}, "permits": [], "running": [],
        "measured": {"executor": {"rss": 0, "cpu_percent": 0.0}, "jobs": {"cpu_cores": 0.0, "memory": 0},
                     "host": {"memory_available": 0}, "disk": {"state_root_free": 0, "reserve": 0, "jobs": 0}},
        "queue_length": counts.get("queued", 0), "counts": counts, "waiting": None, "runners": []})
    figures = {}
    for label, args in (("status --json", ["status", "--json"]), ("jobs", ["jobs"]),
                        ("jobs --status running", ["jobs", "--status", "running"])):
        figures[f"executor {label}"] = percentiles(timed_runs([EXECUTOR, *args], env))
    for label, query in (("Store.counts (each serving-loop tick)", lambda: store.counts()),
                         ("Store.job_list(limit=1000) (executor jobs' query)", lambda: store.job_list(limit=1000)),
                         ("Store.job_list(running)", lambda: store.job_list([Status.running], limit=1000))):
        times = []
        for _ in range(15):
            started = time.monotonic()
            query()
            times.append(time.monotonic() - started)
        figures[label] = percentiles(times)
    return figures


def _claimer(url: str, host: str, roots: list[str], claims: int, out: multiprocessing.Queue) -> None:
    store = Store(url)
    latencies, ids, empty = [], [], 0
    while len(ids) < claims and empty < 20:  # None: nothing fits now (or a race lost twice): try again
        started = time.monotonic()
        job = store.claim(host, roots, 4.0, 8 * 2**30)
        latencies.append(time.monotonic() - started)
        if job is None:
            empty += 1
            continue
        empty = 0
        ids.append(job.id)
        store.transition(job.id, Status.running, Status.rolled_back, owner=(host, job.attempts), reason="agent_error")
    store.close()
    out.put((host, latencies, ids))


def bench_claims(url: str, roots: list[str], claims: int) -> dict:
    out: multiprocessing.Queue = multiprocessing.Queue()
    started = time.monotonic()
    procs = [multiprocessing.Process(target=_claimer, args=(url, f"host-{n}", roots, claims, out)) for n in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    ids = [job_id for _, _, got in results for job_id in got]
    assert len(ids) == len(set(ids)), "a job was claimed twice"
    latencies = [t for _, lat, _ in results for t in lat]
    return {"claims": len(ids), "duplicates": len(ids) - len(set(ids)), "per_second": round(len(ids) / elapsed),
            "latency": percentiles(latencies),
            "per_host": {host: len(got) for host, _, got in results}}


def run(engine: str, args: argparse.Namespace, base: Path) -> dict:
    policies, repos, repo = world(base)
    cluster = None
    if engine == "postgresql":
        cluster = PostgresCluster(fast=False).start()
        url = cluster.create_database("load")
    else:
        url = f"sqlite:///{base / 'home' / 'executor.db'}"
    try:
        settings = Settings(home=base / "home", policies=policies, workspace_roots=[repos], database_url=url,
                            host_id="bench-1")
        store = Store(url)
        figures = {"intake": bench_intake(settings, store, repo, args.files)}
        log(f"{engine}: intake {figures['intake']}")
        figures["bulk insert to 100k (s)"] = round(fill(store, args.jobs, str(repos / "bulk")), 1)
        total = store.counts()
        assert sum(total.values()) == args.jobs, total
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")},
               "EXECUTOR_HOME": str(settings.home), "EXECUTOR_POLICIES": str(policies),
               "EXECUTOR_WORKSPACE_ROOTS": str(repos), "EXECUTOR_DATABASE_URL": url}
        figures["cli"] = bench_cli(settings, store, env)
        log(f"{engine}: cli {figures['cli']}")
        figures["claims, three hosts"] = bench_claims(url, [str(repos)], args.claims)
        after = store.counts()
        assert sum(after.values()) == args.jobs, after  # nothing lost
        store.close()
        return figures
    finally:
        if cluster is not None:
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--claims", type=int, default=600, help="claims per host")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix=f"load-{engine}-") as base:
            results[engine] = run(engine, args, Path(base))
    for engine, figures in results.items():
        print(f"\n== {engine}")
        for key, value in figures.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k:48} {v}")
            else:
                print(f"{key:50} {value}")
    print("\n" + json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
