"""Benchmark: what an overlay workspace costs, against copying the repository.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    .venv/bin/python bench/workspace.py [--sizes 1000,10000,100000] [--dir /var/tmp] [--keep]

For each size it generates a repository of that many small files (~100 per leaf dir, nested two
levels, owned by 1000:1000, one git commit, objects packed) and measures:

* docker run floor -- a bare ``true`` container with ``--network none``, no mount;
* disk cap -- making and mounting a job's disk image (``jobdisk.prepare`` of a 10 GiB ext4 image: sparse
  file, mkfs.ext4, loop device, mount) and unmounting and removing it (``jobdisk.remove``): what the
  per-job filesystem adds at job start and end;
* overlay set-up -- ``executor.workspace.create`` (fresh upper/work dirs + the overlay volume), with the
  layers on a disk image (as jobs get them) and in a plain directory (the watchdog fallback);
* overlay set-up + run -- set-up, a hardened ``true`` container (``Sandbox.start``: the executor's own
  flags, network none, the volume mounted with nocopy), and teardown (``workspace.discard``);
* commit 10 files -- a container writes 5 new and modifies 5 existing files through the overlay, then
  ``scan_upper`` + ``check_conflicts`` + ``apply_change`` onto the repository are timed: from a disk image
  (the files are copied) and from a plain directory on the repository's filesystem (moved);
* baselines -- ``cp -a`` of the repository, ``git worktree add`` of it, and ``rsync -a`` of an
  unchanged copy (what a "sync the copy back" design would pay at least once per job).

Every container timing goes through docker-py (the client the executor itself uses) as
create+start+wait+remove, which is what ``docker run --rm`` does; one docker CLI floor is printed as a
reference. Figures are medians over a few repetitions (one run for the slow baselines at 100k
files); page cache is warm. Nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.sandbox.deployment import AGENT_HOME, LABEL, LABEL_JOB, ContainerSpec, Limits, Sandbox, connect  # noqa: E402
from executor.transaction import jobdisk, workspace  # noqa: E402
from executor.transaction.apply import apply_change  # noqa: E402
from executor.transaction.conflicts import CLOCK_SLACK_NS, check_conflicts  # noqa: E402
from executor.transaction.safefs import remove_tree  # noqa: E402
from executor.transaction.upper import scan_upper  # noqa: E402
from executor.transaction.workspace import Workspace  # noqa: E402

UID = GID = 1000
NETWORK = "none"
FILES_PER_DIR = 100
DIRS_PER_GROUP = 10
LIMITS = Limits(cpus=1.0, memory=512 * 1024**2, pids=256)
DISK = 10 * 1024**3  # the policies' default disk: each job's image

GIT_ENV = {
    **os.environ,
    # The repository is owned by 1000 and git runs as root here: trust it for this process only,
    # without touching any git config file.
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "safe.directory",
    "GIT_CONFIG_VALUE_0": "*",
    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def med(values: list[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------------------------
# repository


def rel_path(i: int) -> str:
    leaf = i // FILES_PER_DIR
    return f"src/g{leaf // DIRS_PER_GROUP:04d}/d{leaf % DIRS_PER_GROUP}/f{i % FILES_PER_DIR:02d}.txt"


def make_repo(path: Path, n: int) -> None:
    path.mkdir(parents=True)
    made = set()
    for i in range(n):
        rel = rel_path(i)
        parent = os.path.dirname(rel)
        if parent not in made:
            (path / parent).mkdir(parents=True, exist_ok=True)
            made.add(parent)
        with open(path / rel, "w") as fh:
            fh.write(f"file {i}\n" + "x" * 64 + "\n")
    (path / "README.md").write_text("bench repository\n")
    git = ["git", "-C", str(path)]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True, env=GIT_ENV)
    subprocess.run(git + ["add", "-A"], check=True, env=GIT_ENV)
    subprocess.run(git + ["commit", "-q", "-m", "initial"], check=True, env=GIT_ENV)
    # Real repositories are mostly packed: don't make cp -a pay for n loose objects.
    subprocess.run(git + ["repack", "-a", "-d", "-q"], check=True, env=GIT_ENV)
    subprocess.run(git + ["prune-packed"], check=True, env=GIT_ENV)
    subprocess.run(["chown", "-R", f"{UID}:{GID}", str(path)], check=True)
    os.chmod(path, 0o755)


def count_entries(path: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(path))


# --------------------------------------------------------------------------------------------
# containers (all through docker-py: create + start + wait + remove == docker run --rm)


class Bench:
    def __init__(self, base: Path, image: str) -> None:
        self.base = base
        self.client = connect()
        self.image = image
        self.sandbox = Sandbox(self.client, image)
        self.sandbox.check_image()
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.state = base / "state"
        self.counter = 0

    def job_id(self, tag: str) -> str:
        self.counter += 1
        return f"{self.prefix}-{tag}-{self.counter}"

    def _wait_remove(self, container) -> int:
        try:
            status = container.wait()
        finally:
            container.remove(force=True)
        return status.get("StatusCode", -1)

    def run_bare(self) -> float:
        """docker run --rm --network none IMAGE true, via docker-py."""
        t0 = time.perf_counter()
        c = self.client.containers.run(self.image, ["true"], detach=True, network_mode=NETWORK,
                                       labels={LABEL: "1", LABEL_JOB: f"{self.prefix}-floor"})
        code = self._wait_remove(c)
        dt = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"bare container exited {code}")
        return dt

    def run_hardened_nomount(self) -> float:
        """The flags of Sandbox.start (copied here: it always mounts a volume), without the mount."""
        t0 = time.perf_counter()
        c = self.client.containers.run(
            self.image, ["true"], detach=True, user=f"{UID}:{GID}", working_dir="/",
            labels={LABEL: "1", LABEL_JOB: f"{self.prefix}-floor"}, network_mode=NETWORK,
            cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,size=512m,mode=1777",
                   AGENT_HOME: "rw,nosuid,nodev,size=512m,mode=1777"},
            nano_cpus=int(LIMITS.cpus * 1e9), mem_limit=LIMITS.memory, memswap_limit=LIMITS.memory,
            pids_limit=LIMITS.pids, init=True,
        )
        code = self._wait_remove(c)
        dt = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"hardened container exited {code}")
        return dt

    def run_in_workspace(self, ws: Workspace, command: list[str]) -> int:
        """The executor's own container path: Sandbox.start (hardened, network none, nocopy mount)."""
        spec = ContainerSpec(name=f"{ws.job_id}-agent", command=command, user=f"{UID}:{GID}",
                             volume=ws.volume, limits=LIMITS, network=NETWORK, labels=ws.labels("agent"))
        c = self.sandbox.start(spec)
        try:
            status = c.wait()
            code = status.get("StatusCode", -1)
            if code != 0:
                c.reload()
                state = c.attrs.get("State", {})
                log(f"container {spec.name} exited {code}: OOMKilled={state.get('OOMKilled')} "
                    f"error={state.get('Error')!r} logs={c.logs()[-2000:]!r}")
        finally:
            self.sandbox.remove(c)
        return code

    def workspace(self, repo: Path, tag: str) -> Workspace:
        jid = self.job_id(tag)
        return Workspace(job_id=jid, attempt=1, repo=repo, root=self.state / "jobs" / jid, uid=UID, gid=GID)

    def cleanup_engine(self) -> list[str]:
        removed = []
        flt = {"label": [f"{LABEL}=1"]}
        for c in self.client.containers.list(all=True, filters=flt):
            if (c.labels.get(LABEL_JOB) or "").startswith(self.prefix):
                c.remove(force=True)
                removed.append(c.name)
        for v in self.client.volumes.list(filters=flt):
            if ((v.attrs.get("Labels") or {}).get(LABEL_JOB) or "").startswith(self.prefix):
                v.remove(force=True)
                removed.append(v.name)
        return removed


# --------------------------------------------------------------------------------------------
# measurements


def measure_disk_cap(base: Path, reps: int) -> dict[str, float]:
    """A job's disk image alone: made and mounted, then unmounted and removed."""
    made, removed = [], []
    for k in range(reps):
        root = base / "disks" / f"job-{k}"
        t0 = time.perf_counter()
        jobdisk.prepare(root, DISK, keep=False)
        t1 = time.perf_counter()
        jobdisk.remove(root)
        t2 = time.perf_counter()
        made.append(t1 - t0)
        removed.append(t2 - t1)
    return {"make": med(made), "remove": med(removed)}


def measure_overlay(b: Bench, repo: Path, reps: int, disk: int | None = None) -> dict[str, float]:
    setup, run, teardown, total = [], [], [], []
    for _ in range(reps):
        ws = b.workspace(repo, "ovl")
        t0 = time.perf_counter()
        workspace.create(b.sandbox, ws, disk=disk)
        t1 = time.perf_counter()
        code = b.run_in_workspace(ws, ["true"])
        t2 = time.perf_counter()
        workspace.discard(b.sandbox, ws)
        t3 = time.perf_counter()
        if code != 0:
            raise RuntimeError(f"container in overlay exited {code}")
        setup.append(t1 - t0)
        run.append(t2 - t1)
        teardown.append(t3 - t2)
        total.append(t3 - t0)
    return {"setup": med(setup), "run": med(run), "teardown": med(teardown), "total": med(total)}


def measure_commit(b: Bench, repo: Path, n: int, reps: int, disk: int | None = None) -> dict[str, float]:
    scans, checks, applies, totals = [], [], [], []
    for rep in range(reps):
        ws = b.workspace(repo, "commit")
        # check_conflicts looks back CLOCK_SLACK_NS before the start (coarse kernel clock): let the
        # previous repetition's apply fall outside that window, or it reads as the person's edit.
        time.sleep(2 * CLOCK_SLACK_NS / 1e9 + 0.05)
        since_ns = time.time_ns()
        workspace.create(b.sandbox, ws, disk=disk)
        # 5 modified files spread over the tree, 5 new ones (two in a new dir).
        modified = [rel_path((n - 1) * k // 4) for k in range(5)]
        new = [f"src/g0000/d0/new-{rep}-{k}.txt" for k in range(3)] + \
              [f"added-{rep}/sub/new-{k}.txt" for k in range(2)]
        script = "set -e\n"
        for p in modified:
            script += f"echo 'changed in rep {rep}' >> '{p}'\n"
        for p in new:
            script += f"mkdir -p \"$(dirname '{p}')\"; echo 'new in rep {rep}' > '{p}'\n"
        code = b.run_in_workspace(ws, ["sh", "-c", script])
        if code == 137:
            # Killed from outside (seen once at 100k, not reproducible; e.g. someone else's sweep
            # of io.executor objects): run the writer once more (the checks below only look at the last line).
            log("writer container was killed (137); running it again")
            code = b.run_in_workspace(ws, ["sh", "-c", script])
        if code != 0:
            workspace.discard(b.sandbox, ws)
            raise RuntimeError(f"writer container exited {code}")
        t0 = time.perf_counter()
        change = scan_upper(ws.upper)
        t1 = time.perf_counter()
        repo_fd = ws.open_repo()
        try:
            conflicts = check_conflicts(change, repo_fd, since_ns)
            t2 = time.perf_counter()
            apply_change(change, ws.upper, repo_fd, ws.uid, ws.gid, journal=ws.journal)
            t3 = time.perf_counter()
        finally:
            os.close(repo_fd)
        files = sorted(e.path for e in change.entries if e.kind == "file")
        workspace.discard(b.sandbox, ws)
        if files != sorted(modified + new) or conflicts or change.refused:
            raise RuntimeError(f"unexpected change: files={files} conflicts={conflicts} refused={change.refused}")
        for p in modified:
            if not (repo / p).read_text().endswith(f"changed in rep {rep}\n"):
                raise RuntimeError(f"{p} was not applied")
        scans.append(t1 - t0)
        checks.append(t2 - t1)
        applies.append(t3 - t2)
        totals.append(t3 - t0)
    return {"scan": med(scans), "check": med(checks), "apply": med(applies), "total": med(totals)}


def measure_cp(repo: Path, scratch: Path, reps: int) -> float:
    times = []
    for k in range(reps):
        dst = scratch / f"cp-{k}"
        times.append(timed(subprocess.run, ["cp", "-a", str(repo), str(dst)], check=True))
        remove_tree(dst)
    return med(times)


def measure_worktree(repo: Path, scratch: Path, reps: int) -> float:
    times = []
    for k in range(reps):
        dst = scratch / f"wt-{k}"
        cmd = ["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(dst)]
        times.append(timed(subprocess.run, cmd, check=True, env=GIT_ENV))
        remove_tree(dst)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], check=True, env=GIT_ENV)
    return med(times)


def measure_rsync(repo: Path, scratch: Path, reps: int) -> float:
    dst = scratch / "rsync-copy"
    subprocess.run(["cp", "-a", str(repo), str(dst)], check=True)  # set-up: an identical copy
    times = []
    for _ in range(reps):
        # The copy-back direction of a sync design: copy -> repository, nothing changed.
        cmd = ["rsync", "-a", f"{dst}/", f"{repo}/"]
        times.append(timed(subprocess.run, cmd, check=True))
    remove_tree(dst)
    return med(times)


# --------------------------------------------------------------------------------------------
# main


def machine_facts(base: Path) -> list[str]:
    fs = subprocess.run(["df", "-T", str(base)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    dinfo = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}} {{.DockerRootDir}}"],
                           capture_output=True, text=True).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return [
        f"nproc {os.cpu_count()}, memory {mem:.1f} GiB, kernel {os.uname().release}, "
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"bench dir {base}: {fs[1]} on {fs[0]} (mounted at {fs[-1]})",
        f"docker {dinfo}",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated file counts")
    ap.add_argument("--dir", default="/var/tmp", help="parent of the temp dir (same filesystem as the state root)")
    ap.add_argument("--image", default="executor-sandbox:latest")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the cheap measurements")
    ap.add_argument("--keep", action="store_true", help="keep the generated repositories and state")
    ap.add_argument("--large-commit", type=int, default=0, metavar="N",
                    help="only the large-commit benchmark (bench/large_commit.py) with N new files, e.g. 200000")
    args = ap.parse_args()
    if args.large_commit:
        import large_commit

        large_commit.run(args.large_commit, args.dir)
        return 0
    if os.geteuid() != 0:
        print("run as root: the executor chowns upper dirs and the repository to 1000:1000", file=sys.stderr)
        return 2
    for tool in ("git", "rsync", "cp"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing (apt-get install {tool})", file=sys.stderr)
            return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    base = Path(tempfile.mkdtemp(prefix="executor-bench-", dir=args.dir))
    b = Bench(base, args.image)
    log(f"bench dir {base}, objects prefixed {b.prefix}")
    rows, details, plains = [], [], []
    cap: dict[str, float] = {}
    try:
        log("warm-up container")
        b.run_bare()
        cli_floor = med([timed(subprocess.run, ["docker", "run", "--rm", "--network", NETWORK, args.image, "true"],
                               check=True) for _ in range(3)])
        log("disk cap: a 10 GiB image made, mounted, unmounted and removed")
        cap = measure_disk_cap(base, max(10, args.reps))
        for n in sizes:
            repo = base / f"repo-{n}"
            scratch = base / f"scratch-{n}"
            scratch.mkdir()
            log(f"{n}: generating repository")
            t = timed(make_repo, repo, n)
            log(f"{n}: repository ready in {t:.1f}s ({count_entries(repo)} entries incl. .git)")
            # Flush the generated tree now, so its writeback doesn't land inside the measurements.
            log(f"{n}: sync took {timed(os.sync):.1f}s; load average {os.getloadavg()[0]:.2f}")
            slow = n >= 100_000
            reps = args.reps
            log(f"{n}: docker run floor")
            floor = med([b.run_bare() for _ in range(reps)])
            hard = med([b.run_hardened_nomount() for _ in range(reps)])
            log(f"{n}: overlay set-up / run / teardown (layers on a disk image, then plain)")
            ovl = measure_overlay(b, repo, reps, disk=DISK)
            plain = measure_overlay(b, repo, reps)
            log(f"{n}: commit of 10 files (from a disk image, then plain)")
            com = measure_commit(b, repo, n, 3, disk=DISK)
            com_plain = measure_commit(b, repo, n, 3)
            log(f"{n}: cp -a")
            cp = measure_cp(repo, scratch, 1 if slow else 3)
            log(f"{n}: git worktree add")
            wt = measure_worktree(repo, scratch, 1 if slow else 3)
            log(f"{n}: rsync -a (unchanged)")
            rs = measure_rsync(repo, scratch, 3)
            rows.append([f"{n:,}", fmt(floor), fmt(ovl["setup"]), fmt(ovl["total"]), fmt(com["total"]),
                         fmt(cp), fmt(wt), fmt(rs)])
            details.append([f"{n:,}", fmt(hard), fmt(ovl["run"]), fmt(ovl["teardown"]), fmt(com["scan"]),
                            fmt(com["check"]), fmt(com["apply"])])
            plains.append([f"{n:,}", fmt(plain["setup"]), fmt(ovl["setup"] - plain["setup"]), fmt(plain["teardown"]),
                           fmt(ovl["teardown"] - plain["teardown"]), fmt(com_plain["apply"]), fmt(com["apply"])])
            log(f"{n}: done")
            if not args.keep:
                remove_tree(repo)
                remove_tree(scratch)
    finally:
        leftovers = b.cleanup_engine()
        if leftovers:
            log(f"removed leftover engine objects: {leftovers}")
        if args.keep:
            log(f"kept {base}")
        else:
            remove_tree(base)

    print()
    for fact in machine_facts(Path(args.dir)):
        print(fact)
    print("container timings: docker-py create+start+wait+remove (as `docker run --rm`), network none; "
          f"docker CLI floor for reference: {fmt(cli_floor)}")
    print()
    table(["size", "docker run floor", "overlay set-up", "overlay set-up + run", "commit 10 files",
           "cp -a", "git worktree add", "rsync (unchanged)"], rows)
    print()
    print("details: hardened floor = Sandbox.start's flags without a mount; run/teardown split the set-up + run"
          " column; commit = scan_upper + check_conflicts + apply_change")
    table(["size", "hardened floor", "run true (mounted)", "teardown", "scan_upper", "check_conflicts",
           "apply_change"], details)
    print()
    print(f"medians of {args.reps} (set-up, floors), 3 (commit, rsync), 3 or 1 at >=100k (cp -a, worktree);"
          " overlay set-up + run includes teardown (workspace.discard); page cache warm")
    print()
    print(f"disk cap: a job's 10 GiB disk image made and mounted in {fmt(cap['make'])}, unmounted and removed in "
          f"{fmt(cap['remove'])} (medians of {max(10, args.reps)})")
    print("the columns above put each job's layers on a disk image (as jobs run); against plain layers (the "
          "watchdog fallback, where the commit moves files):")
    table(["size", "set-up (plain)", "added by the image", "teardown (plain)", "added by the image",
           "apply (plain: move)", "apply (image: copy)"], plains)
    return 0


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = " | ".join(h.rjust(w) for h, w in zip(header, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    sys.exit(main())
