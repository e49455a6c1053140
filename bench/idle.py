"""Benchmark: what an idle ``executor serve`` costs, with an empty queue, on SQLite and on PostgreSQL.

Run by hand (as root, with the Docker engine up and the sandbox image built; PostgreSQL 15's binaries for
the PostgreSQL run):

    .venv/bin/python bench/idle.py [--seconds 60] [--stores sqlite,postgres] [--profile]

Each run starts ``executor serve`` as a process on a throwaway state root (its own PostgreSQL cluster for
the PostgreSQL run, tests/postgres.py), waits until it serves and has settled (``--settle`` seconds), then
reads the process's CPU time and RSS with psutil over ``--seconds`` of an empty queue, and how often it
wrote ``status.json`` meanwhile. With ``--profile`` it also runs py-spy (if installed) on the process for
the same window and prints the busiest functions. Then one job file lands in the spool and the time to the
job's intake and to its claim are printed (the wake-up: it must not wait for a poll).

Nothing here asserts: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXECUTOR = str(Path(sys.executable).parent / "executor")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")


def log(message: str) -> None:
    print(f"[idle] {message}", file=sys.stderr, flush=True)


def start(base: Path, url: str | None) -> tuple[subprocess.Popen, dict, Path]:
    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    os.chown(repos, 1000, 1000)
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "claude-sonnet-4-5"\nauth_env = "T"\n'
                                           'base_url = "http://127.0.0.1:9"\n')
    (policies / "default.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env.update({"EXECUTOR_HOME": str(home), "EXECUTOR_POLICIES": str(policies), "EXECUTOR_WORKSPACE_ROOTS": str(repos),
                "EXECUTOR_SANDBOX_IMAGE": IMAGE, "T": "sk-bench-0000", "EXECUTOR_DISK_RESERVE": "1g"})
    if url:
        env["EXECUTOR_DATABASE_URL"] = url
    process = subprocess.Popen([EXECUTOR, "serve"], env=env, stdout=subprocess.DEVNULL,
                               stderr=(base / "serve.log").open("wb"), start_new_session=True)
    deadline = time.monotonic() + 120
    while not (home / "status.json").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"executor serve did not start: {(base / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return process, env, repos


def measure(process: subprocess.Popen, home: Path, seconds: float, profile: bool) -> dict:
    import psutil

    proc = psutil.Process(process.pid)
    spy = None
    if profile and Path(PY_SPY).exists():
        spy = subprocess.Popen([PY_SPY, "record", "--pid", str(process.pid), "--duration", str(int(seconds)),
                                "--format", "raw", "--output", str(home / "profile.txt"),
                                "--rate", "50", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = home / "status.json"
    writes, last = 0, status.stat().st_mtime_ns
    before, started = proc.cpu_times(), time.monotonic()
    ctx_before = proc.num_ctx_switches()
    while time.monotonic() - started < seconds:
        time.sleep(0.05)
        mtime = status.stat().st_mtime_ns
        if mtime != last:
            writes, last = writes + 1, mtime
    after, took = proc.cpu_times(), time.monotonic() - started
    ctx_after = proc.num_ctx_switches()
    cpu = (after.user - before.user) + (after.system - before.system)
    if spy is not None:
        spy.wait(timeout=seconds + 60)
    return {"cpu_percent": 100 * cpu / took, "user": after.user - before.user, "system": after.system - before.system,
            "rss_mib": proc.memory_info().rss / 2**20, "threads": proc.num_threads(), "status_writes": writes,
            "seconds": took, "wakeups": (ctx_after.voluntary - ctx_before.voluntary) / took}


def wake_up(env: dict, repos: Path, home: Path, url: str | None) -> tuple[float, float]:
    """Seconds from a job file landing in the spool to the job in the store, and to its claim (it must not
    wait for a poll)."""
    from executor.intake.spool import Spool
    from executor.store import reads

    repo = repos / "app"
    repo.mkdir()
    os.chown(repo, 1000, 1000)
    target = url if url else home / "executor.db"
    started = time.monotonic()
    Spool(home / "spool").write(json.dumps({"id": "wake", "runner": "r", "workspace": str(repo),
                                            "prompt": "p"}).encode())
    taken = claimed = float("nan")
    while time.monotonic() - started < 60:
        with reads.connect(target) as conn:
            job = reads.job(conn, "wake")
        if job is not None and taken != taken:
            taken = time.monotonic() - started
        if job is not None and job.host_id is not None:
            return taken, time.monotonic() - started
        time.sleep(0.005)
    return taken, claimed


def top_functions(path: Path, limit: int = 15) -> list[tuple[str, int]]:
    """From py-spy's raw (collapsed) output of the busy samples: each executor function with the samples it was
    on the stack for (inclusive), busiest first."""
    counts: dict[str, int] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        for frame in {re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if "executor/" in f}:
            counts[frame] = counts.get(frame, 0) + int(n)
    return sorted(counts.items(), key=lambda kv: -kv[1])[:limit]


def run(store: str, seconds: float, settle: float, profile: bool) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"bench-idle-{store}-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    cluster = None
    process = None
    try:
        url = None
        if store == "postgres":
            from tests.postgres import PostgresCluster

            cluster = PostgresCluster(fast=False).start()
            url = cluster.create_database()
        process, env, repos = start(base, url)
        log(f"{store}: serving (pid {process.pid}); settling {settle:g} s, then measuring {seconds:g} s")
        time.sleep(settle)
        figures = measure(process, base / "home", seconds, profile)
        figures["intake_seconds"], figures["claim_seconds"] = wake_up(env, repos, base / "home", url)
        figures["profile"] = top_functions(base / "home" / "profile.txt")
        return figures
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--profile", action="store_true", help="sample the process with py-spy meanwhile")
    args = ap.parse_args()
    results = {store: run(store, args.seconds, args.settle, args.profile) for store in args.stores.split(",")}
    print(f"\nan idle `executor serve`, empty queue, over {args.seconds:g} s:")
    for store, f in results.items():
        print(f"  {store:9} cpu {f['cpu_percent']:5.2f} % of one core (user {f['user']:.2f} s, system "
              f"{f['system']:.2f} s)  rss {f['rss_mib']:.0f} MiB  threads {f['threads']}  "
              f"status.json written {f['status_writes']}x  voluntary switches {f['wakeups']:.0f}/s  "
              f"a job file to the store in {f['intake_seconds'] * 1000:.0f} ms, claimed in "
              f"{f['claim_seconds'] * 1000:.0f} ms")
        for frame, n in f["profile"]:
            print(f"      {n:6} {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
