"""Benchmark: the graded gate's added wall time per job, with and without the *before* cache, against the
exit-code gate, on a real project's own test suite.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    EXECUTOR_SANDBOX_IMAGE=executor-sandbox:latest .venv/bin/python bench/evaluation.py \
        [--package more-itertools==11.2.1] [--jobs 3] [--json out.json]

The project: a released package's source distribution, fetched at bench time with ``pip download
--no-binary :all:`` (nothing of it is kept in this repository): its package and its own ``tests/``, run by
``python3 -m pytest`` in the sandbox (for ``more-itertools`` 11.2.1: 765 tests, no dependency). Each job
goes through the real executor (spool, overlay, the real Claude Code CLI scripted on loopback, the test
gate): its agent adds a function to the package and a test of it (a job that changes tests and code, the
graded gate's dearest case: *after*, *before* and *tests only* runs). Every policy says ``review =
"always"``, so each job stops in ``awaiting_review`` right after its gate and the repository stays as it
was: the *before* cache keeps its state from job to job.

Modes, ``--jobs`` jobs each, each mode an executor of its own; the jobs run one at a time, round robin over
the modes (so a shared machine's changing load falls on every mode alike):
  * ``exit-code``: today's gate (one run of the command);
  * ``graded, no cache``: ``evaluation = "tests"`` on a copy whose tree is touched before each job (a new
    state each time, so every job runs *before*: what the cache keyed on a clean HEAD gave a queue on a
    repository whose commits leave it dirty);
  * ``graded, cache``: the same on a tree left as it is: the first job runs *before* and stores it,
    the others take it from the cache;
  * ``graded, land = branch``: the same with ``review = "never"`` and ``land = "branch"``: every job lands
    as a branch of its own and the working tree stays as it was, so *before* still runs once (the figures
    include making each job's commit);
  * ``graded, test-only jobs``: jobs that only add a test (of code the suite already covers, so the
    hardening rule rolls them back): *after* and *before* run under coverage.py, *before* once.

Reported: the gate's wall time per job (from the job entering ``testing`` to its settling), median and each,
its added time against the exit-code gate, and the median duration of each kind of run. Nothing here
asserts on timing; on a shared machine read the figures as an order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
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

import docker  # noqa: E402

from executor.intake.spool import Spool  # noqa: E402
from executor.scheduling.service import Executor  # noqa: E402
from executor.settings import Settings  # noqa: E402
from executor.store import Status  # noqa: E402
from executor.transaction import jobdisk  # noqa: E402
from tests.scripted_api import ScriptedAPI, Turn  # noqa: E402

IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")
MODEL = "claude-sonnet-4-5"
TOKEN_VAR = "BENCH_RUNNER_TOKEN"
UID = 1000
PYTEST = 'python3 -m pytest -q -p no:cacheprovider --junitxml="$EXECUTOR_JUNIT_XML"'
SETTLED = {Status.awaiting_review, Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled}
#: (label, evaluation, a git repository, the jobs' kind, land)
MODES = (("exit-code", "exit-code", False, "fix", "files"), ("graded, no cache", "tests", False, "fix", "files"),
         ("graded, cache", "tests", True, "fix", "files"), ("graded, test-only jobs", "tests", True, "tests", "files"),
         ("graded, land = branch", "tests", True, "fix", "branch"))


def fetch(package: str, into: Path) -> Path:
    """The package's source distribution, unpacked: its project directory."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", str(into), package], check=True)
    archive = next(into.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return next(p for p in into.iterdir() if p.is_dir())


def package_dir(project: Path) -> Path:
    found = [p for p in project.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests"]
    if not found or not (project / "tests").is_dir():
        raise SystemExit(f"{project.name}: expected a package directory and tests/ in its sdist")
    return found[0]


def make_repo(project: Path, dest: Path, git: bool) -> None:
    shutil.copytree(project, dest)
    if git:
        for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=bench", "-c", "user.email=b@example.invalid",
                                                      "commit", "-q", "-m", "release"]):
            subprocess.run(["git", "-c", "safe.directory=*", "-C", str(dest), *args], check=True)
    for path in [dest, *dest.rglob("*")]:
        os.lchown(path, UID, UID)


def script(package: str, n: int, kind: str) -> list[Turn]:
    """A job that adds a function to the package and a test that proves it, or (``tests``) only a test."""
    if kind == "tests":
        test = (f"from {package} import chunked\n\n\ndef test_chunked_{n}():\n"
                f"    assert list(chunked(range({n + 3}), 2))[0] == [0, 1]\n")
        return [Turn.tool("Write", {"file_path": f"/workspace/tests/test_bench_{n}.py", "content": test}),
                Turn.text("Added a test.")]
    code = f"\n\ndef bench_scale_{n}(x):\n    return {n + 2} * x\n"
    test = (f"from {package}.more import bench_scale_{n}\n\n\ndef test_bench_scale_{n}():\n"
            f"    assert bench_scale_{n}(3) == {3 * (n + 2)}\n")
    target = f"{package}/more.py"
    return [Turn.tool("Bash", {"command": f"printf '%s' '{code}' >> {target}", "description": "add it"}),
            Turn.tool("Write", {"file_path": f"/workspace/tests/test_bench_{n}.py", "content": test}),
            Turn.text("Added the function and its test.")]


class Mode:
    """One executor (its own state root, policy and repository copy) whose jobs all run one way."""

    def __init__(self, label: str, evaluation: str, git: bool, kind: str, land: str, base: Path, project: Path,
                 jobs: int) -> None:
        self.label = label
        review = "never" if land == "branch" else "always"
        home, policies, repos = base / "home", base / "policies", base / "repos"
        self.jobs_dir = home / "jobs"
        for d in (home, policies, repos):
            d.mkdir(parents=True)
        (policies / "default.toml").write_text(
            f'cpus = 1.0\nmemory = "2g"\npids = 512\ntimeout = "10m"\nnetwork = "host"\nreview = "{review}"\n'
            f"test_command = '{PYTEST}'\ntest_timeout = \"10m\"\nevaluation = \"{evaluation}\"\n"
            f'land = "{land}"\n')
        self.repo = repos / "project"
        make_repo(project, self.repo, git)
        package = package_dir(self.repo).name
        self.api = ScriptedAPI({f"bench-{n}:": script(package, n, kind) for n in range(jobs)}).start()
        (policies / "runners.toml").write_text(
            f'[runners.bench]\nmodel = "{MODEL}"\nauth_env = "{TOKEN_VAR}"\nbase_url = "{self.api.base_url}"\n')
        self.spool = Spool(home / "spool")
        settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                            poll_interval=0.2, result_grace=5.0)
        self.executor = Executor(settings, {TOKEN_VAR: "sk-fake"}, docker.from_env(timeout=120))
        self.stop = threading.Event()
        self.server = threading.Thread(target=self.executor.serve, args=(self.stop,), daemon=True)
        self.server.start()
        self.rows: list[dict] = []

    def run(self, n: int) -> None:
        """Job ``n``, to its settling; its figures go to ``rows``."""
        key = f"bench-{n}"
        if self.label == "graded, no cache":  # a new state of the tree: the cache cannot serve this job
            os.utime(next(p for p in sorted(self.repo.rglob("*.py"))))
        self.spool.write(json.dumps({"id": key, "runner": "bench", "workspace": str(self.repo),
                                     "prompt": f"{key}: add a helper and test it"}).encode())
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            job = self.executor.store.get(key)
            if job is not None and job.status in SETTLED:
                break
            time.sleep(0.3)
        self.rows.append(_measure(self.executor, key))

    def close(self) -> dict:
        self.stop.set()
        self.server.join(timeout=120)
        self.api.stop()
        for job_dir in sorted(self.jobs_dir.glob("*")):  # a job kept for review keeps its disk image mounted
            jobdisk.remove(job_dir)
        return {"mode": self.label, "jobs": self.rows}


def _measure(executor: Executor, key: str) -> dict:
    job = executor.store.get(key)
    events = executor.store.events(job_id=key)
    states = [(e.ts, e.data.get("status")) for e in events if e.kind == "state"]
    entered = next(ts for ts, status in states if status == "testing")
    left = next(ts for ts, status in states if ts >= entered and status not in ("testing",))
    runs = [{"run": e.data["run"], "cached": e.data["cached"], "duration": e.data.get("duration")}
            for e in events if e.kind == "test_run"]
    if not runs:
        runs = [{"run": "tests", "cached": False, "duration": e.data.get("duration")}
                for e in events if e.kind == "tests"]
    ev = job.evaluation or {}
    return {"id": key, "status": job.status.value, "reason": job.reason, "verdict": ev.get("verdict"),
            "fail_to_pass": ev.get("fail_to_pass"), "before_cache": ev.get("before_cache"),
            "gate_seconds": round((left - entered).total_seconds(), 2), "runs": runs}


def report(results: list[dict]) -> str:
    """Medians (a shared machine's load spikes make means lie)."""
    median = statistics.median
    base = median(j["gate_seconds"] for j in results[0]["jobs"])
    lines = [f"{'mode':24} {'jobs':>4} {'gate s/job':>10} {'added s/job':>11}  each job (s)"]

    def row(label: str, times: list[float], note: str = "") -> str:
        added = "-" if label == results[0]["mode"] else f"{median(times) - base:+.1f}"
        return (f"{label:24} {len(times):>4} {median(times):>10.1f} {added:>11}  "
                + (note or ", ".join(f"{t:.1f}" for t in times)))

    for result in results:
        lines.append(row(result["mode"], [j["gate_seconds"] for j in result["jobs"]]))
    cached = next(r for r in results if r["mode"] == "graded, cache")
    hits = [j["gate_seconds"] for j in cached["jobs"] if j["before_cache"] == "hit"]
    cold = [j["gate_seconds"] for j in cached["jobs"] if j["before_cache"] != "hit"]
    if hits and cold:
        lines.append(row("  of which cold", cold, "the first job on the state: runs before, stores it"))
        lines.append(row("  of which cache hits", hits))
    lines.append("")
    lines.append("median duration of each run (s; a cached run costs only the lookup):")
    for result in results:
        kinds: dict[str, list[float]] = {}
        for job in result["jobs"]:
            for run in job["runs"]:
                name = run["run"] + (" (cached)" if run["cached"] else "")
                kinds.setdefault(name, []).append(run["duration"] or 0.0)
        lines.append(f"  {result['mode']:22} " + ", ".join(f"{k} {median(v):.1f}" for k, v in kinds.items()))
    lines.append("")
    for result in results[1:]:
        lines.append(f"{result['mode']}: verdicts " + ", ".join(f"{j['verdict']} ({j['status']})" for j in result["jobs"])
                     + f"; before cache: {', '.join(str(j['before_cache']) for j in result['jobs'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="more-itertools==11.2.1", help="a pip requirement with an sdist")
    parser.add_argument("--jobs", type=int, default=3, help="jobs per mode")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--report", type=Path, help="only print the figures of an earlier --json file")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as tmp:
        base = Path(tmp)
        os.chmod(base, 0o711)  # the owner runs git on the repository: it must reach it
        project = fetch(args.package, base / "sdist")
        print(f"project: {project.name} ({sum(1 for _ in (project / 'tests').rglob('test_*.py'))} test files), "
              f"image {IMAGE}", flush=True)
        modes = [Mode(*spec, base / f"mode{i}", project, args.jobs) for i, spec in enumerate(MODES)]
        try:
            # Round robin, one job at a time: a shared machine's changing load falls on every mode alike.
            for n in range(args.jobs):
                for mode in modes:
                    mode.run(n)
                print(f"  round {n + 1} of {args.jobs}: " + ", ".join(
                    f"{m.label} {m.rows[-1]['gate_seconds']:.1f}s" for m in modes), flush=True)
        finally:
            results = [mode.close() for mode in modes]
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=str))
    print(report(results))


if __name__ == "__main__":
    main()
