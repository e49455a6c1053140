"""Benchmark: a very large change (200,000 new files by default) committed into a repository.

Run by hand (as root, with the Docker engine up and the sandbox image built); ``bench/workspace.py
--large-commit N`` runs it too:

    .venv/bin/python bench/large_commit.py [--files 200000] [--dir /var/tmp]

Three measurements:

* spool flood: 2,000 job files dropped at once; how fast intake takes them and how stale ``status.json``
  gets meanwhile (admission is held back, so only intake and the loop are measured).

* apply: the same upper dir (N files in directories of 100, written as the repository's owner) applied
  by ``apply_change`` by copy (no journal: what happens across filesystems or mount points), by move
  (journaled, same filesystem: each file is renamed into place: the watchdog fallback's layers) and from a
  job's disk image (journaled, as the pipeline commits: the image is a filesystem of its own, so each file
  is copied, holes kept). Scan and conflict check are timed apart.
* end to end: a real executor (serving loop in this process, the real sandbox image and Claude Code CLI
  against the scripted Messages API) runs one job whose agent writes the N files; meanwhile
  ``executor status --json`` is run as a subprocess every 0.25 s, timed, and the age of the snapshot it
  reads is recorded. The commit's duration is read from the job's own events.

Nothing here asserts on timing; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from executor.transaction import jobdisk  # noqa: E402
from executor.transaction.apply import apply_change  # noqa: E402
from executor.transaction.conflicts import check_conflicts  # noqa: E402
from executor.transaction.safefs import as_owner, remove_tree  # noqa: E402
from executor.transaction.upper import scan_upper  # noqa: E402

UID = GID = 1000
PER_DIR = 100
IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")
EXECUTOR = str(Path(sys.executable).parent / "executor")


def log(message: str) -> None:
    print(f"[large-commit] {message}", file=sys.stderr, flush=True)


def make_repo(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "README.md").write_text("large commit bench\n")
    for p in (path, path / "README.md"):
        os.chown(p, UID, GID)


def make_upper(upper: Path, n: int) -> None:
    """``n`` new files under ``upper``, as the agent (the repository's owner) would leave them."""
    upper.mkdir(parents=True)
    os.chown(upper, UID, GID)
    with as_owner(UID, GID):
        for i in range(n):
            d = upper / "gen" / f"d{i // PER_DIR:05d}"
            if i % PER_DIR == 0:
                d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / f"f{i % PER_DIR:03d}.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, f"file {i}\n".encode())
            os.close(fd)


def apply_once(base: Path, n: int, move: bool, image: bool = False) -> dict[str, float]:
    """``move``: journaled (moves where it can); ``image``: the upper dir on a job's disk image (8 GiB)."""
    tag = "image" if image else "move" if move else "copy"
    repo, upper = base / f"repo-{tag}", base / f"upper-{tag}"
    if image:
        jobdisk.prepare(base / "image-job", 8 * 2**30, keep=False)
        upper = base / "image-job" / jobdisk.LAYERS / "upper"
    make_repo(repo)
    time.sleep(0.05)  # past the conflict check's clock slack (20 ms): the repository is older than the job
    since = time.time_ns()
    log(f"writing {n:,} files into an upper dir ({tag})")
    make_upper(upper, n)
    os.sync()
    fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        change = scan_upper(upper)
        t1 = time.perf_counter()
        conflicts = check_conflicts(change, fd, since)
        t2 = time.perf_counter()
        apply_change(change, upper, fd, UID, GID, journal=base / f"journal-{tag}.json" if move else None)
        t3 = time.perf_counter()
    finally:
        os.close(fd)
    landed = sum(len(files) for _d, _s, files in os.walk(repo / "gen"))
    if conflicts or landed != n:
        raise RuntimeError(f"{tag}: conflicts={conflicts[:5]} landed={landed} of {n}")
    remove_tree(repo)
    if image:
        jobdisk.remove(base / "image-job")
    else:
        remove_tree(upper)
    return {"scan": t1 - t0, "check": t2 - t1, "apply": t3 - t2}


# ------------------------------------------------------------------------------------------ end to end


def end_to_end(base: Path, n: int, disk_cap: str = "auto") -> dict:
    import docker

    from executor.intake.spool import Spool
    from executor.scheduling.service import Executor
    from executor.settings import Settings
    from executor.store import TERMINAL
    from tests.scripted_api import ScriptedAPI, Turn

    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    make_repo(repos / "big")
    (policies / "default.toml").write_text('cpus = 1.0\nmemory = "1g"\npids = 256\ntimeout = "20m"\n'
                                           'network = "host"\ntest_command = "true"\ntest_timeout = "10m"\n'
                                           'disk = "8g"\nreview = "never"\n')
    writer = (f"python3 -c \"import os\nfor i in range({n}):\n    d = 'gen/d%05d' % (i // {PER_DIR})\n"
              f"    os.makedirs(d, exist_ok=True) if i % {PER_DIR} == 0 else None\n"
              f"    open(d + '/f%03d.txt' % (i % {PER_DIR}), 'w').write('file %d\\\\n' % i)\"")
    script = {"large": [Turn.tool("Bash", {"command": writer, "description": "write", "timeout": 600000}),
                        Turn.text("Done.")]}
    env = {**os.environ, "EXECUTOR_HOME": str(home), "EXECUTOR_POLICIES": str(policies),
           "EXECUTOR_WORKSPACE_ROOTS": str(repos), "EXECUTOR_SANDBOX_IMAGE": IMAGE, "EXECUTOR_POLL_INTERVAL": "0.5"}
    with ScriptedAPI(script) as api:
        (policies / "runners.toml").write_text(f'[runners.scripted]\nmodel = "claude-sonnet-4-5"\n'
                                               f'auth_env = "BENCH_TOKEN"\nbase_url = "{api.base_url}"\n')
        settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                            poll_interval=0.5, result_grace=5.0, disk_cap=disk_cap)
        executor = Executor(settings, {"BENCH_TOKEN": "sk-bench-0000"}, docker.from_env(timeout=300))
        stop = threading.Event()
        serving = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
        serving.start()
        Spool(home / "spool").write(json.dumps({"id": "large", "runner": "scripted", "workspace": str(repos / "big"),
                                                "prompt": "large: write many files"}).encode())
        samples: list[tuple[str, float, float]] = []  # (job status, seconds the command took, snapshot age)
        try:
            while True:
                t0 = time.perf_counter()
                out = subprocess.run([EXECUTOR, "status", "--json"], env=env, capture_output=True, text=True)
                took = time.perf_counter() - t0
                view = json.loads(out.stdout) if out.returncode == 0 else {}
                job = executor.store.get("large")
                samples.append((job.status.value if job else "none", took, view.get("status_age_seconds") or 0.0))
                if job is not None and job.status in TERMINAL:
                    break
                time.sleep(0.25)
        finally:
            stop.set()
            serving.join(timeout=300)
        job = executor.store.get("large")
        events = [e for e in executor.store.events(job_id="large") if e.kind in ("state", "session_home")]
        cap = executor.disk.mode if executor.disk else disk_cap
    began = next(e.ts for e in events if e.data.get("status") == "committing")
    applied = next(e.ts for e in events if e.kind == "session_home")  # the apply (and the carry) done
    ended = next(e.ts for e in events if e.data.get("status") == "succeeded")
    landed = sum(len(files) for _d, _s, files in os.walk(repos / "big" / "gen"))
    during = [s for s in samples if s[0] == "committing"] or samples
    return {"status": job.status.value, "reason": job.reason, "landed": landed,
            "commit_seconds": (ended - began).total_seconds(), "cap": cap,
            "apply_seconds": (applied - began).total_seconds(), "cleanup_seconds": (ended - applied).total_seconds(),
            "status_all": [s[1] for s in samples], "status_committing": [s[1] for s in during],
            "age_max": max(s[2] for s in samples), "age_committing_max": max(s[2] for s in during)}


def flood(base: Path, n: int) -> dict:
    """``n`` job files dropped into the spool at once; the loop takes them while the snapshot's age is watched.
    Admission is held (a disk reserve larger than the disk), so only intake and the loop are measured."""
    import docker

    from executor.intake.spool import Spool
    from executor.scheduling import snapshot
    from executor.scheduling.service import Executor
    from executor.settings import Settings
    from executor.store import Status

    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    make_repo(repos / "r")
    (policies / "default.toml").write_text('test_command = "true"\nnetwork = "none"\n')
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "T"\n')
    settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                        poll_interval=0.5, disk_reserve=2**62)
    executor = Executor(settings, {"T": "x" * 16}, docker.from_env(timeout=120))
    stop = threading.Event()
    serving = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
    serving.start()
    time.sleep(2)
    spool = Spool(home / "spool")
    body = json.dumps({"runner": "r", "workspace": str(repos / "r"), "prompt": "p"}).encode()
    t0 = time.perf_counter()
    for _ in range(n):
        spool.write(body)
    written = time.perf_counter() - t0
    ages, took = [], []
    while True:
        q0 = time.perf_counter()
        view = snapshot.read(settings.status_path) or {}
        took.append(time.perf_counter() - q0)
        ages.append(view.get("age_seconds", 0.0))
        if executor.store.counts().get(Status.queued, 0) >= n:
            break
        time.sleep(0.1)
    taken = time.perf_counter() - t0
    stop.set()
    serving.join(timeout=120)
    return {"files": n, "write_seconds": written, "intake_seconds": taken, "rate": n / taken, "age_max": max(ages)}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(files: int, parent: str, spool_files: int = 2000, disk_cap: str = "auto") -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-large-", dir=parent))
    os.chmod(base, 0o755)  # the owner's uid writes below it
    try:
        log(f"a flood of {spool_files} spool files")
        flooded = flood(base / "flood", spool_files)
        copy = apply_once(base, files, move=False)
        move = apply_once(base, files, move=True)
        image = apply_once(base, files, move=True, image=True)
        log("end to end through a real executor")
        e2e = end_to_end(base / "e2e", files, disk_cap)
    finally:
        remove_tree(base)
    print(f"\nspool flood: {flooded['files']:,} files written in {flooded['write_seconds']:.1f} s, all queued "
          f"{flooded['intake_seconds']:.1f} s after the first ({flooded['rate']:.0f} jobs/s); status.json at most "
          f"{flooded['age_max']:.1f} s old meanwhile")
    print(f"\n{files:,} new files in {files // PER_DIR:,} directories; filesystem of {parent}")
    print(f"  scan_upper {copy['scan']:.2f} s, check_conflicts {copy['check']:.2f} s")
    print(f"  apply by copy: {copy['apply']:.2f} s   apply by move: {move['apply']:.2f} s   apply from a disk "
          f"image (copy, as jobs commit): {image['apply']:.2f} s (scan_upper there {image['scan']:.2f} s)")
    print(f"  end to end ({e2e['cap']}): {e2e['status']} ({e2e['reason']}), {e2e['landed']:,} files landed, commit "
          f"took {e2e['commit_seconds']:.2f} s (committing -> succeeded: the apply and carry {e2e['apply_seconds']:.2f} s, "
          f"the clean-up {e2e['cleanup_seconds']:.2f} s)")
    during = e2e["status_committing"]
    print(f"  `executor status` while committing: {len(during)} calls, p50 {statistics.median(during) * 1000:.0f} ms, "
          f"max {max(during) * 1000:.0f} ms; over the whole job p50 {statistics.median(e2e['status_all']) * 1000:.0f} "
          f"ms, max {max(e2e['status_all']) * 1000:.0f} ms")
    print(f"  snapshot age seen: max {e2e['age_committing_max']:.1f} s while committing, "
          f"{e2e['age_max']:.1f} s over the job")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--dir", default="/var/tmp", help="parent of the temp dir (same filesystem as the state root)")
    ap.add_argument("--disk-cap", default="auto", choices=["auto", "image", "watchdog"],
                    help="EXECUTOR_DISK_CAP of the end-to-end executor (watchdog: plain layers, the commit moves)")
    args = ap.parse_args()
    run(args.files, args.dir, disk_cap=args.disk_cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
