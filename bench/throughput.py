"""Benchmark: job throughput of the executor against plain ``docker run`` of the same agent work.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    .venv/bin/python bench/throughput.py [--jobs 100] [--budget-cpus 4] [--job-cpus 1]

Three phases, each with N jobs at the same concurrency (budget cpus / job cpus, also bounded by the
memory budget):

1. executor -- a throwaway world (state root, a policy with the job's cpus, 512m, network host,
   test_command "true"; runners.toml pointing at a scripted Messages API that answers every request at
   once with the text "Done."), one repository per job (one job per workspace), the executor's serve
   loop in a thread of this process (poll interval 0.2 s), N job files dropped into the spool at once.
   Timed from the first spool write until every job is settled. Per-job latency comes from the store:
   queue wait = started_at - created_at, run = finished_at - started_at. While it runs a sampler
   thread reads this process's RSS and CPU % every 0.2 s: the executor is the main thing running in
   this process (the scripted API runs in a child process so its CPU is not counted).
2. plain -- the same image and the same claude command line (``agent.claude_code.command.argv`` in ``agent.launch.container_command``: the
   executor adds ``--include-partial-messages``), the same env (ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY,
   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1, HOME=/tmp), ``--network host --user 1000:1000 --rm`` and
   the same cpu/memory limits, through the docker CLI from a thread pool.
3. floor -- ``docker run --rm --network none IMAGE true`` at the same concurrency.

The executor does more per job than the plain run (an overlay volume, a second container for the test
gate, the commit scan, the database, the log stream), which is what "overhead per job" measures.
Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
import psutil  # noqa: E402

from executor.agent.claude_code.command import argv  # noqa: E402
from executor.agent.launch import container_command  # noqa: E402
from executor.intake.spool import Spool  # noqa: E402
from executor.logs import TextFormatter  # noqa: E402
from executor.sandbox.deployment import LABEL, LABEL_INSTANCE, instance_id  # noqa: E402
from executor.settings import Settings, parse_size  # noqa: E402
from executor.store import TERMINAL, Status  # noqa: E402

IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")
MODEL = "claude-sonnet-4-5"
TOKEN_VAR = "BENCH_RUNNER_TOKEN"
TOKEN_VALUE = "sk-fake"
UID = GID = 1000
PROMPT = "bench job {i}: say done"

# The scripted API in a child process: prints its base URL, serves until stdin closes.
API_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from tests.scripted_api import ScriptedAPI, Turn
    api = ScriptedAPI(default=Turn.text("Done.")).start()
    print(api.base_url, flush=True)
    sys.stdin.read()
    n = len(api.requests)
    api.stop()
    print(n, flush=True)
""")


# ------------------------------------------------------------------------------------------ helpers


class ScriptedAPIProcess:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", API_CHILD, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://"):
            raise RuntimeError(f"the scripted API did not start (got {self.base_url!r})")

    def stop(self) -> int | None:
        """Stop it; returns how many requests it received."""
        try:
            self.proc.stdin.close()
            out = self.proc.stdout.read().strip()
            self.proc.wait(timeout=30)
            return int(out) if out.isdigit() else None
        except Exception:  # noqa: BLE001 - best effort at teardown
            self.proc.kill()
            self.proc.wait()
            return None


class Sampler:
    """RSS and CPU % of this process every ``interval`` seconds, in a background thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.rss: list[int] = []
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self.t0 = time.monotonic()
        self.cpu_t0 = sum(self.proc.cpu_times()[:2])
        self.proc.cpu_percent(None)  # prime
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self.proc.oneshot():
                self.rss.append(self.proc.memory_info().rss)
                self.cpu.append(self.proc.cpu_percent(None))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.monotonic() - self.t0
        self.cpu_seconds = sum(self.proc.cpu_times()[:2]) - self.cpu_t0


def chown_tree(root: Path, uid: int = UID) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.lchown(dirpath, uid, uid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)


def dist(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return (f"mean {statistics.fmean(values):6.2f}  median {statistics.median(values):6.2f}  "
            f"p95 {p95:6.2f}  min {values[0]:6.2f}  max {values[-1]:6.2f}")


def utc(dt):
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


# ------------------------------------------------------------------------------------ executor run


def run_executor(args, base: Path, base_url: str, concurrency: int) -> dict:
    from executor.scheduling.service import Executor

    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    (policies / "default.toml").write_text(
        f'cpus = {args.job_cpus}\nmemory = "{args.job_memory}"\npids = 256\ntimeout = "10m"\n'
        'network = "host"\ntest_command = "true"\ntest_timeout = "2m"\n')
    (policies / "runners.toml").write_text(
        f'[runners.scripted]\nmodel = "{MODEL}"\nauth_env = "{TOKEN_VAR}"\nbase_url = "{base_url}"\n')
    for i in range(args.jobs):
        repo = repos / f"repo{i:04d}"
        repo.mkdir()
        (repo / "README.md").write_text(f"repository {i}\n")
    chown_tree(repos)

    settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                        poll_interval=0.2, result_grace=5.0, budget_cpus=args.budget_cpus,
                        budget_memory=parse_size(args.budget_memory))

    # The executor's log, to a file: scanned for warnings and errors afterwards.
    log_path = base / "executor.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(TextFormatter())
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    client = docker.from_env(timeout=120)
    executor = Executor(settings, {TOKEN_VAR: TOKEN_VALUE}, client)
    stop = threading.Event()
    serve_error: list[BaseException] = []

    def serve() -> None:
        try:
            executor.serve(stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            serve_error.append(exc)

    sampler = Sampler(0.2).start()
    thread = threading.Thread(target=serve, name="executor-serve", daemon=True)
    thread.start()
    time.sleep(1.0)  # let start-up (image check, recovery) finish before the clock starts
    store = executor.store

    spool = Spool(settings.spool_dir)
    t0 = time.time()
    for i in range(args.jobs):
        spool.write(json.dumps({"id": f"bench-{i:04d}", "runner": "scripted",
                                "workspace": str(repos / f"repo{i:04d}"),
                                "prompt": PROMPT.format(i=i)}).encode())
    t_written = time.time()
    deadline = time.monotonic() + args.timeout
    max_running = 0
    timed_out = False
    last_report = time.monotonic()
    while True:
        counts = store.counts()
        settled = sum(n for st, n in counts.items() if st in TERMINAL)
        max_running = max(max_running, len(executor.slots))
        if settled >= args.jobs:
            break
        if serve_error or not thread.is_alive():
            print(f"  the serve loop ended early: {serve_error[:1]}", flush=True)
            break
        if time.monotonic() > deadline:
            timed_out = True
            print(f"  timed out after {args.timeout}s: {dict((k.value, v) for k, v in counts.items())}", flush=True)
            break
        if time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            print(f"  ... {time.time() - t0:6.1f}s settled {settled}/{args.jobs} running {len(executor.slots)}",
                  flush=True)
        time.sleep(0.2)
    t_end = time.time()
    sampler.stop()

    jobs = store.jobs()
    stop.set()
    thread.join(timeout=180)
    if thread.is_alive():
        print("  the executor did not stop within 180 s", flush=True)
    root_logger.removeHandler(handler)
    handler.close()

    # Anything of this instance left on the engine (the executor should have removed all of it).
    instance = instance_id(settings.home)
    filters = {"label": [f"{LABEL}=1", f"{LABEL_INSTANCE}={instance}"]}
    leftovers = []
    for c in client.containers.list(all=True, filters=filters):
        leftovers.append(c.name)
        c.remove(force=True)
    for v in client.volumes.list(filters=filters):
        leftovers.append(v.name)
        v.remove(force=True)
    client.close()

    statuses: dict[str, int] = {}
    for job in jobs:
        statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
    failures = [(j.id, j.status.value, j.reason, (j.error or "")[:200]) for j in jobs if j.status != Status.succeeded]
    queue_wait = [(utc(j.started_at) - utc(j.created_at)).total_seconds() for j in jobs if j.started_at]
    run_time = [(utc(j.finished_at) - utc(j.started_at)).total_seconds()
                for j in jobs if j.started_at and j.finished_at]
    end_to_end = [(utc(j.finished_at).timestamp() - t0) for j in jobs if j.finished_at]
    attempts = sum(j.attempts for j in jobs)

    problems = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line[9:16].strip() in ("warning", "error", "critical") or line.startswith("Traceback"):
            problems.append(line)

    return {
        "total": t_end - t0, "write": t_written - t0, "succeeded": statuses.get("succeeded", 0),
        "statuses": statuses, "failures": failures, "queue_wait": queue_wait, "run_time": run_time,
        "end_to_end": end_to_end, "attempts": attempts, "max_running": max_running, "timed_out": timed_out,
        "rss_peak": max(sampler.rss, default=0), "rss_start": sampler.rss[0] if sampler.rss else 0,
        "cpu_mean": statistics.fmean(sampler.cpu) if sampler.cpu else 0.0, "cpu_peak": max(sampler.cpu, default=0.0),
        "cpu_seconds": sampler.cpu_seconds, "sample_wall": sampler.wall, "problems": problems,
        "leftovers": leftovers, "serve_error": serve_error, "log": log_path,
    }


# ------------------------------------------------------------------------------------------ baselines


def docker_claude_cmd(base_url: str, i: int, args) -> list[str]:
    env = {"ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": TOKEN_VALUE,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "HOME": "/tmp",
           # as the executor sets them, so the CLI does the same work
           "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_RETRIES": "2"}
    cmd = ["docker", "run", "--rm", "--network", "host", "--user", f"{UID}:{GID}",
           "--cpus", str(args.job_cpus), "--memory", args.job_memory, "--memory-swap", args.job_memory]
    for k, v in env.items():
        cmd += ["-e", f"{k}={v}"]
    return cmd + [IMAGE] + container_command(argv(PROMPT.format(i=i), MODEL), sealed=False)


def claude_ok(stdout: str) -> bool:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("type") == "result":
                return obj.get("subtype") == "success" and not obj.get("is_error")
    return False


def run_pool(make_cmd, n: int, concurrency: int, check=None) -> dict:
    times: list[float] = [0.0] * n
    ok: list[bool] = [False] * n
    errors: list[str] = []

    def one(i: int) -> None:
        start = time.monotonic()
        proc = subprocess.run(make_cmd(i), capture_output=True, text=True)
        times[i] = time.monotonic() - start
        ok[i] = proc.returncode == 0 and (check(proc.stdout) if check else True)
        if not ok[i]:
            errors.append(f"#{i} rc={proc.returncode} stderr={proc.stderr.strip()[-300:]!r} "
                          f"stdout_tail={proc.stdout.strip()[-300:]!r}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    return {"total": time.monotonic() - t0, "times": times, "ok": sum(ok), "errors": errors}


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--budget-cpus", type=float, default=4.0)
    parser.add_argument("--job-cpus", type=float, default=1.0)
    parser.add_argument("--job-memory", default="512m")
    parser.add_argument("--budget-memory", default="8g")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on the executor phase after this")
    parser.add_argument("--dir", default=None, help="where to make the temporary world (default: system temp)")
    parser.add_argument("--keep-log", default=None, help="copy the executor's log here")
    parser.add_argument("--skip-executor", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    if os.geteuid() != 0:
        print("run as root: the executor mounts overlays and the repositories are owned by uid 1000")
        return 2
    free_memory = parse_size(args.budget_memory) - parse_size("256m")  # minus the default reserve
    concurrency = max(1, min(int(args.budget_cpus / args.job_cpus + 1e-9), free_memory // parse_size(args.job_memory)))
    n = args.jobs
    print(f"jobs {n}, concurrency {concurrency} (budget {args.budget_cpus:g} cpus / {args.job_cpus:g} per job, "
          f"{args.budget_memory} / {args.job_memory}), host {os.cpu_count()} cpus, image {IMAGE}", flush=True)

    base = Path(tempfile.mkdtemp(prefix="executor-bench-", dir=args.dir))
    api = ScriptedAPIProcess()
    ex = plain = floor = None
    api_requests = None
    try:
        # warm-up: the image's layers and the CLI's first start (not timed); also checks the API works
        warm = run_pool(lambda i: docker_claude_cmd(api.base_url, i, args), 1, 1, claude_ok)
        print(f"warm-up claude run: {warm['times'][0]:.2f}s ok={warm['ok']}", flush=True)
        if warm["errors"]:
            print("  " + warm["errors"][0], flush=True)

        if not args.skip_executor:
            print("executor run ...", flush=True)
            ex = run_executor(args, base / "world", api.base_url, concurrency)
            print(f"  done in {ex['total']:.1f}s: {ex['statuses']}", flush=True)
            if args.keep_log:
                shutil.copy(ex["log"], args.keep_log)

        if not args.skip_baseline:
            print("plain docker run (claude) ...", flush=True)
            plain = run_pool(lambda i: docker_claude_cmd(api.base_url, i, args), n, concurrency, claude_ok)
            print(f"  done in {plain['total']:.1f}s, ok {plain['ok']}/{n}", flush=True)
            print("floor: docker run --rm --network none IMAGE true ...", flush=True)
            floor = run_pool(lambda i: ["docker", "run", "--rm", "--network", "none", IMAGE, "true"], n, concurrency)
            print(f"  done in {floor['total']:.1f}s, ok {floor['ok']}/{n}", flush=True)
    finally:
        api_requests = api.stop()
        shutil.rmtree(base, ignore_errors=True)

    # ------------------------------------------------------------------ report
    mib = 1024 * 1024
    rows = [("N jobs", f"{n}"), ("concurrency", f"{concurrency}")]
    if ex:
        rows += [("executor total s", f"{ex['total']:.1f}"),
                 ("executor per-job s (total/N*conc)", f"{ex['total'] / n * concurrency:.2f}")]
    if plain:
        rows += [("plain docker run (claude) total s", f"{plain['total']:.1f}"),
                 ("plain per-job s (total/N*conc)", f"{plain['total'] / n * concurrency:.2f}")]
    if floor:
        rows += [("floor (docker run true) total s", f"{floor['total']:.1f}"),
                 ("floor per-job s (total/N*conc)", f"{floor['total'] / n * concurrency:.2f}")]
    if ex and plain:
        rows += [("overhead per job s ((exec-plain)/N*conc)", f"{(ex['total'] - plain['total']) / n * concurrency:.2f}")]
    if ex:
        rows += [("executor peak RSS MiB", f"{ex['rss_peak'] / mib:.0f} (at start {ex['rss_start'] / mib:.0f})"),
                 ("executor CPU % mean/peak", f"{ex['cpu_mean']:.1f} / {ex['cpu_peak']:.1f}"),
                 ("executor CPU s (of wall s)", f"{ex['cpu_seconds']:.1f} of {ex['sample_wall']:.1f}"),
                 ("succeeded/N", f"{ex['succeeded']}/{n}")]
    if plain:
        rows += [("plain claude ok/N", f"{plain['ok']}/{n}")]
    width = max(len(k) for k, _ in rows)
    print()
    print("=" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 24))

    if ex:
        print("\nexecutor per-job latency (s, from the store):")
        print(f"  queue wait (started-created)  {dist(ex['queue_wait'])}")
        print(f"  run (finished-started)        {dist(ex['run_time'])}")
        print(f"  completion since first write  {dist(ex['end_to_end'])}")
        print(f"  spool write of {n} files: {ex['write']:.2f}s; max jobs running at once: {ex['max_running']}; "
              f"attempts: {ex['attempts']}")
        if ex["failures"]:
            print(f"  {len(ex['failures'])} job(s) did not succeed:")
            for f in ex["failures"][:10]:
                print(f"    {f}")
        if ex["problems"]:
            print(f"  executor log: {len(ex['problems'])} warning/error line(s), first ones:")
            for line in ex["problems"][:10]:
                print(f"    {line[:300]}")
        else:
            print("  executor log: no warnings or errors")
        if ex["leftovers"]:
            print(f"  leftover containers/volumes removed by the bench: {ex['leftovers'][:10]}")
        if ex["serve_error"]:
            print(f"  serve loop raised: {ex['serve_error'][0]!r}")
        if ex["timed_out"]:
            print("  the executor phase TIMED OUT")
    if plain:
        print(f"\nplain docker run (claude) per-job wall (s): {dist(plain['times'])}")
        for e in plain["errors"][:5]:
            print(f"  error: {e}")
    if floor:
        print(f"floor docker run true per-job wall (s):     {dist(floor['times'])}")
        for e in floor["errors"][:5]:
            print(f"  error: {e}")
    print(f"scripted API requests received: {api_requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
