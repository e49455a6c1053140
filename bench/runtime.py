"""Benchmark: a job under runc against the same job under gVisor (``runtime = "runsc"``), side by side.

Run by hand (as root, the engine up with runsc registered as the README says, the sandbox image built):

    .venv/bin/python bench/runtime.py [--runs 3] [--package more-itertools==10.5.0]

Two kinds of job, each run ``--runs`` times one after another under each runtime, sealed (the real CLI
against a scripted Messages API in a child process that answers "Done." at once, through the job's gateway):

- trivial: an empty repository, test command ``true``: what a runtime adds to a job's two containers;
- test-heavy: a real package's source distribution (``pip download --no-binary``, its own test suite
  included; cached in /tmp) as the repository, test command ``python3 -m pytest -q -p no:cacheprovider
  tests``: the package's own suite in the gate.

Printed: each kind's run time (the store's started_at to finished_at) per runtime, median and spread, and
the runsc/runc ratio of the medians. The issue's goal: runsc within 1.3x of runc on the test-heavy job.
Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import docker  # noqa: E402
from throughput import IMAGE, MODEL, TOKEN_VALUE, TOKEN_VAR, ScriptedAPIProcess, chown_tree  # noqa: E402

from executor.intake.spool import Spool  # noqa: E402
from executor.settings import Settings  # noqa: E402
from executor.store import TERMINAL, Status  # noqa: E402

CACHE = Path("/tmp/bench-runtime-packages")
HEAVY_TESTS = "python3 -m pytest -q -p no:cacheprovider tests"


def package_source(requirement: str) -> Path:
    """The unpacked source distribution of ``requirement`` (its tests included), downloaded once."""
    CACHE.mkdir(exist_ok=True)
    archives = [p for p in CACHE.glob("*.tar.gz")]
    if not archives:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(CACHE), requirement], check=True)
        archives = list(CACHE.glob("*.tar.gz"))
    unpacked = CACHE / "src"
    if not unpacked.exists():
        with tarfile.open(archives[0]) as tar:
            tar.extractall(unpacked, filter="data")
    (top,) = [p for p in unpacked.iterdir() if p.is_dir()]
    if not (top / "tests").is_dir():
        raise SystemExit(f"{top.name} has no tests/ directory: pick a package whose sdist ships its tests")
    return top


def run_runtime(runtime: str, runs: int, source: Path, base: Path, base_url: str) -> dict[str, list[float]]:
    from executor.scheduling.service import Executor

    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    (policies / "default.toml").write_text(
        f'cpus = 1.0\nmemory = "2g"\npids = 256\ntimeout = "10m"\nnetwork = "sealed"\nruntime = "{runtime}"\n'
        'test_command = "true"\ntest_timeout = "10m"\n')
    (policies / "heavy.toml").write_text(
        (policies / "default.toml").read_text().replace('test_command = "true"', f'test_command = "{HEAVY_TESTS}"'))
    (policies / "runners.toml").write_text(
        f'[runners.scripted]\nmodel = "{MODEL}"\nauth_env = "{TOKEN_VAR}"\nbase_url = "{base_url}"\n')
    jobs = []
    for i in range(runs):
        (repos / f"trivial{i}").mkdir()
        (repos / f"trivial{i}" / "README.md").write_text("trivial\n")
        shutil.copytree(source, repos / f"heavy{i}")
        jobs += [(f"trivial{i}", "default"), (f"heavy{i}", "heavy")]
    chown_tree(repos)
    settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                        poll_interval=0.2, result_grace=5.0, budget_cpus=1.0)
    executor = Executor(settings, {TOKEN_VAR: TOKEN_VALUE}, docker.from_env(timeout=120))
    stop = threading.Event()
    thread = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
    thread.start()
    spool, store = Spool(home / "spool"), executor.store
    times: dict[str, list[float]] = {"trivial": [], "heavy": []}
    try:
        for job_id, policy in jobs:  # one at a time: each job has the machine to itself
            spool.write(f'{{"id": "{job_id}", "runner": "scripted", "policy": "{policy}", '
                        f'"workspace": "{repos / job_id}", "prompt": "say done"}}'.encode())
            while (job := store.get(job_id)) is None or job.status not in TERMINAL:
                time.sleep(0.2)
            if job.status != Status.succeeded:
                raise SystemExit(f"{runtime} {job_id} ended {job.status.value}: {job.reason} {job.error}")
            times[policy if policy == "heavy" else "trivial"].append(
                (job.finished_at - job.started_at).total_seconds())
    finally:
        stop.set()
        thread.join(timeout=120)
    return times


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--package", default="more-itertools==10.5.0")
    args = parser.parse_args()
    runtimes = sorted(docker.from_env().info().get("Runtimes") or {})
    if "runsc" not in runtimes:
        raise SystemExit(f"the engine offers {runtimes}: register runsc first (README, gVisor)")
    source = package_source(args.package)
    api = ScriptedAPIProcess()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        for runtime in ("runc", "runsc"):
            with tempfile.TemporaryDirectory(prefix=f"bench-runtime-{runtime}-") as base:
                results[runtime] = run_runtime(runtime, args.runs, source, Path(base), api.base_url)
    finally:
        api.stop()
    print(f"package: {source.name}; tests: {HEAVY_TESTS}")
    for kind in ("trivial", "heavy"):
        for runtime in ("runc", "runsc"):
            print(f"{kind:8s} {runtime:6s} {summary(results[runtime][kind])}")
        ratio = statistics.median(results["runsc"][kind]) / statistics.median(results["runc"][kind])
        print(f"{kind:8s} runsc/runc {ratio:.2f}x")


if __name__ == "__main__":
    main()
