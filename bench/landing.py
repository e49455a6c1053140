"""Benchmark: what landing a change in git costs (policy ``land``), against copying it into the working tree.

Run by hand (as root; no Docker needed: the job's upper dir is built by hand, as overlayfs leaves it):

    .venv/bin/python bench/landing.py [--sizes 10,1000,10000] [--base 1000] [--reps 3] [--dir /var/tmp]

For each size it makes a git repository of ``--base`` committed files (owned by 1000:1000) and an upper dir of
that many new 1 KiB files (100 per directory) and times, each on a fresh copy of both:

* files -- ``scan_upper`` + ``apply_change`` (today's land = "files"; the upper dir is on the repository's
  filesystem, so files are moved, as without a disk image);
* commit -- the same, plus the commit on the current branch (``landing.prepare``: fast-import of the blobs, a
  temporary index, write-tree, commit-tree; ``landing.finish``: the real index at the job's paths, update-ref);
* branch -- ``scan_upper`` + ``landing.prepare`` + ``landing.finish`` onto ``executor/<id>`` (nothing applied).

Figures are medians; page cache is warm. Nothing here asserts on timing.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.store import Job  # noqa: E402
from executor.transaction import landing  # noqa: E402
from executor.transaction.apply import apply_change  # noqa: E402
from executor.transaction.git import Git  # noqa: E402
from executor.transaction.safefs import DIR_FLAGS  # noqa: E402
from executor.transaction.upper import scan_upper  # noqa: E402
from executor.transaction.workspace import Workspace  # noqa: E402

OWNER = 1000
LOOK = ("-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *LOOK, "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def fill(root: Path, n: int, prefix: str) -> None:
    for i in range(n):
        d = root / f"{prefix}{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.txt").write_bytes(f"{prefix} {i}\n".encode().ljust(1024, b"x"))


def chown(root: Path) -> None:
    subprocess.run(["chown", "-R", f"{OWNER}:{OWNER}", str(root)], check=True)


def template(base: Path, files: int, n: int) -> tuple[Path, Path]:
    repo, upper = base / "tpl-repo", base / "tpl-upper"
    for p in (repo, upper):
        shutil.rmtree(p, ignore_errors=True)
    fill(repo, files, "base")
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=P", "-c", "user.email=p@x", "commit", "-qm", "start")
    git(repo, "gc", "-q")
    fill(upper, n, "new")
    chown(repo)
    chown(upper)
    return repo, upper


def fresh(base: Path, repo: Path, upper: Path) -> Workspace:
    job_root = base / "job"
    shutil.rmtree(job_root, ignore_errors=True)
    shutil.rmtree(base / "repo", ignore_errors=True)
    subprocess.run(["cp", "-a", str(repo), str(base / "repo")], check=True)
    (job_root / "layers").mkdir(parents=True)
    subprocess.run(["cp", "-a", str(upper), str(job_root / "layers" / "upper")], check=True)
    return Workspace(job_id="bench", attempt=1, repo=base / "repo", root=job_root, uid=OWNER, gid=OWNER,
                     git_author="bench <bench@localhost>")


def land(ws: Workspace, mode: str) -> float:
    job = Job(id="bench", runner="r", prompt="bench", workspace=str(ws.repo), session_id="bench",
              policy={"land": mode}, final_text="Bench change")
    fd = os.open(ws.repo, DIR_FLAGS)
    try:
        g = Git(fd, OWNER, OWNER)
        job.git = {"mode": mode, "ref": "refs/heads/main", "base": g.rev("HEAD")}
        started = time.perf_counter()
        change = scan_upper(ws.upper)
        plan = landing.prepare(job, ws, change, fd) if mode != "files" else None
        if mode != "branch":
            apply_change(change, ws.upper, fd, OWNER, OWNER)
        if plan is not None:
            landing.finish(g, plan, None, None)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--base", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="executor-bench-landing-", dir=args.dir))
    base.chmod(0o711)
    try:
        print(f"git {git(base, 'version').split()[-1]}; a repository of {args.base} committed files; "
              f"medians of {args.reps}")
        print(f"{'change':>14} {'files':>9} {'commit':>9} {'branch':>9}")
        for n in (int(x) for x in args.sizes.split(",")):
            repo, upper = template(base, args.base, n)
            row = {}
            for mode in ("files", "commit", "branch"):
                row[mode] = statistics.median(land(fresh(base, repo, upper), mode) for _ in range(args.reps))
            print(f"{n:>8} files {row['files']:>8.3f}s {row['commit']:>8.3f}s {row['branch']:>8.3f}s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
