"""``executor land``: a branch job's commit, applied to the working tree and committed on the current branch.

Owns landing later what a job with ``land = "branch"`` left on ``executor/<id>``: its change (the branch's
commit against the HEAD the job started from) is written into an upper dir of its own
(``$EXECUTOR_HOME/land/<id>/``: blobs read back from git as bytes, as the owner; a deleted path as a
whiteout), checked against the repository with the commit's own conflict rule (no path the change touches
may have changed in the working tree since the job started), then applied and committed the way
``land = "commit"`` does it (the commit itself when HEAD is still where the job started, else the change
rebuilt on HEAD), under a journal of its own: an ``executor land`` that was interrupted finishes when run
again. The job stays ``succeeded``; its row records the landing (``Job.git["landed"]``) and an event says so.

Must never: land a job that is not a succeeded branch job, a branch that moved since the job made it, or a
change that conflicts with the working tree; write into the upper dir with root's rights; or leave its
directory behind once the landing is done (only its empty lock file stays).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from ..clock import utcnow
from ..errors import Conflict, GitError, ReviewError, WorkspaceChanged
from ..settings import Settings
from ..store import Job, Status, Store
from ..transaction import jobdisk
from ..transaction.apply import apply_change, planned
from ..transaction.conflicts import check_conflicts
from ..transaction.git import Git
from ..transaction.journal import load, save
from ..transaction.landing import Landing, check_head, finish, land_plan
from ..transaction.safefs import DIR_FLAGS, as_owner, lstat_at, open_dir_path
from ..transaction.upper import Change, scan_upper, split_path
from ..transaction.workspace import Workspace

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def land(store: Store, settings: Settings, job_id: str, *, by: str) -> Job:
    """Apply and commit the branch job ``job_id``'s change; the job as recorded after. ``Conflict`` (nothing
    applied) when the working tree changed at its paths since the job started; ``ReviewError`` when it
    cannot be landed."""
    job = _landable(store, job_id)
    root = settings.home / "land" / job.id
    ws = dataclasses.replace(Workspace.of(settings, job), root=root)
    with _locked(root):
        try:
            repo_fd = ws.open_repo()
        except WorkspaceChanged as exc:
            raise ReviewError(f"{exc}; job {job.id}'s branch stays as it is") from None
        try:
            done = _land(job, ws, repo_fd)
        finally:
            os.close(repo_fd)
        landed = {"branch": done.branch, "commit": done.commit, "parent": done.parent, "note": done.note,
                  "at": utcnow().isoformat(), "by": by}
        store.update_job(job.id, git={**(job.git or {}), "landed": landed})
        store.add_event(job, job.attempts, "land", landed)
        jobdisk.remove(root)
    return store.get(job.id) or job


def _landable(store: Store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    record = job.git or {}
    if job.status != Status.succeeded or record.get("mode") != "branch":
        raise ReviewError(f"job {job.id} is not a succeeded job of a policy with land = \"branch\" "
                          f"({job.status.value}, land = {record.get('mode') or 'files'}): only such a job's branch "
                          "is landed")
    if record.get("landed"):
        landed = record["landed"]
        raise ReviewError(f"job {job.id} was landed already: commit {landed.get('commit')} on {landed.get('branch')}")
    if not record.get("commit"):
        raise ReviewError(f"job {job.id} left no commit to land: {record.get('note') or 'its change was empty'}")
    return job


@contextmanager
def _locked(root: Path):
    """One ``executor land`` of a job at a time (a second one waits for the first)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(root.parent, 0o700)
    fd = os.open(root.parent / f"{root.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _land(job: Job, ws: Workspace, repo_fd: int) -> Landing:
    git = Git(repo_fd, ws.uid, ws.gid)
    plan = load(ws.journal)
    try:
        if plan is None:
            plan = _plan(job, ws, git, repo_fd)
        apply_change(Change(), ws.upper, repo_fd, ws.uid, ws.gid, journal=ws.journal)
        plan = load(ws.journal)
        return finish(git, Landing(**plan.git), ws.journal, plan)
    except GitError as exc:
        raise ReviewError(f"job {job.id} could not be landed: {exc}") from None


def _plan(job: Job, ws: Workspace, git: Git, repo_fd: int):
    """The journaled plan: the branch's change in an upper dir, checked, and the commit HEAD is to get."""
    record = job.git or {}
    ref = "refs/heads/" + record["branch"]
    tip = git.rev(ref)
    if tip is None:
        raise ReviewError(f"the branch {record['branch']} of job {job.id} is gone: nothing to land")
    if tip != record["commit"]:
        raise ReviewError(f"the branch {record['branch']} moved since job {job.id} made it (it was {record['commit']}, "
                          f"it is {tip}): merge it with git instead")
    landing = land_plan(git, job, check_head(git, "commit", ws.repo))
    jobdisk.remove(ws.root)
    jobdisk.prepare(ws.root, None, keep=False)
    _materialize(git, git.diff_tree(record.get("base"), record["commit"]), ws, repo_fd)
    change = scan_upper(ws.upper)
    conflicts = check_conflicts(change, repo_fd, job.start_ns or 0)
    if conflicts:
        jobdisk.remove(ws.root)
        raise Conflict(conflicts)
    plan = planned(change)
    plan.git = dataclasses.asdict(landing)
    save(ws.journal, plan)
    return plan


def _materialize(git: Git, entries: list[tuple[str, str, str]], ws: Workspace, repo_fd: int) -> None:
    """Write the change (index entries: mode, id, path; mode 0: gone) as an overlay upper dir would hold it."""
    repo_mode = os.fstat(repo_fd).st_mode & 0o777
    os.mkdir(ws.upper, 0o700)
    os.chown(ws.upper, ws.uid, ws.gid)
    os.chmod(ws.upper, repo_mode)
    added = {path for mode, _, path in entries if mode in ("100644", "100755", "120000")}
    above = {"/".join(p.split("/")[:n]) for p in added for n in range(1, p.count("/") + 1)}
    upper_fd = os.open(ws.upper, DIR_FLAGS)
    try:
        with as_owner(ws.uid, ws.gid):
            for mode, _, path in entries:
                parts = split_path(path)
                covered = any("/".join(parts[:n]) in added for n in range(1, len(parts)))
                if mode == "0" and not covered and path not in above:
                    _at(upper_fd, repo_fd, parts, lambda fd, name: os.mknod(
                        name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=fd))
            blobs = [(mode, oid, path) for mode, oid, path in entries if path in added]
            for (mode, _, path), (_, chunks) in zip(blobs, git.read_blobs([oid for _, oid, _ in blobs])):
                _at(upper_fd, repo_fd, split_path(path), lambda fd, name, m=mode, c=chunks: _write(fd, name, m, c))
    finally:
        os.close(upper_fd)


def _at(upper_fd: int, repo_fd: int, parts: list[str], make) -> None:
    """``make(dir_fd, name)`` in the upper dir's directory of ``parts``, made as the repository has it."""
    for depth in range(len(parts) - 1):
        parent = open_dir_path(upper_fd, parts[:depth])
        try:
            if lstat_at(parent, parts[depth]) is None:
                os.mkdir(parts[depth], _repo_dir_mode(repo_fd, parts[:depth + 1]), dir_fd=parent)
        finally:
            os.close(parent)
    parent = open_dir_path(upper_fd, parts[:-1])
    try:
        make(parent, parts[-1])
    finally:
        os.close(parent)


def _repo_dir_mode(repo_fd: int, parts: list[str]) -> int:
    """The mode of the repository's directory at ``parts`` (a new one: 0755): the apply gives it to it."""
    try:
        fd = open_dir_path(repo_fd, parts)
    except OSError:
        return 0o755
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)


def _write(dir_fd: int, name: str, mode: str, chunks) -> None:
    if mode == "120000":
        os.symlink(os.fsdecode(b"".join(chunks)), name, dir_fd=dir_fd)
        return
    fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fchmod(fd, 0o755 if mode == "100755" else 0o644)
    finally:
        os.close(fd)
