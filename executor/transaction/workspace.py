"""The job's workspace: an overlayfs view of the repository whose upper directory *is* the transaction.

Owns the on-disk layout of ``$EXECUTOR_HOME/jobs/<id>/`` and the overlay volumes built on it: the agent's
view (lower = the repository, upper = ``upper/``) and the test view (lower = the job's ``upper/`` over the
repository, upper = a throwaway ``test-upper/``), so tests see exactly what would be committed and
cannot change it. Setting up copies nothing; its cost does not grow with the repository.

Must never: write into the repository (committing is ``commit.py``), or leave a volume behind on
discard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..sandbox.deployment import LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE, Deployment
from ..settings import Settings
from ..store import Job
from .safefs import remove_tree


@dataclass(frozen=True)
class Workspace:
    job_id: str
    attempt: int
    repo: Path
    root: Path  # $EXECUTOR_HOME/jobs/<id>
    uid: int
    gid: int

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def test_upper(self) -> Path:
        return self.root / "test-upper"

    @property
    def test_work(self) -> Path:
        return self.root / "test-work"

    @property
    def sockets(self) -> Path:
        """A sealed attempt's socket directory (bind-mounted into its agent container)."""
        return self.root / "sock"

    @property
    def volume(self) -> str:
        return f"executor-{self.job_id}-a{self.attempt}"

    @property
    def test_volume(self) -> str:
        return f"executor-{self.job_id}-a{self.attempt}-test"

    def labels(self, role: str) -> dict[str, str]:
        return {LABEL_JOB: self.job_id, LABEL_ATTEMPT: str(self.attempt), LABEL_ROLE: role}

    @classmethod
    def of(cls, settings: Settings, job: Job, attempt: int | None = None) -> Workspace:
        """The workspace of ``job``'s attempt (its latest by default)."""
        return cls(job_id=job.id, attempt=job.attempts if attempt is None else attempt, repo=Path(job.workspace),
                   root=settings.job_dir(job.id), uid=job.repo_uid or 1000, gid=job.repo_gid or 1000)


def _fresh_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    if path.exists() or path.is_symlink():
        remove_tree(path)
    path.mkdir(parents=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def create(sandbox: Deployment, ws: Workspace, keep_upper: bool = False) -> None:
    """Upper/work dirs owned by the agent's uid and the agent's overlay volume.

    ``keep_upper``: continue on the upper dir an earlier attempt left (a retry after a rate limit resumes
    the conversation that knows that state); otherwise start from the clean repository.
    """
    ws.root.mkdir(parents=True, exist_ok=True)
    os.chmod(ws.root, 0o711)
    # The merged root takes owner and mode from upper: give it the repository root's.
    repo_mode = os.stat(ws.repo).st_mode & 0o777
    if not (keep_upper and ws.upper.is_dir()):
        _fresh_dir(ws.upper, ws.uid, ws.gid, repo_mode)
    _fresh_dir(ws.work, ws.uid, ws.gid, 0o700)  # overlay needs an empty work dir for every mount
    sandbox.create_overlay_volume(ws.volume, [str(ws.repo)], str(ws.upper), str(ws.work), ws.labels("workspace"))


def create_test_view(sandbox: Deployment, ws: Workspace) -> None:
    """A throwaway layer above the job's changes: what the tests write is never committed."""
    repo_mode = os.stat(ws.upper).st_mode & 0o777
    _fresh_dir(ws.test_upper, ws.uid, ws.gid, repo_mode)
    _fresh_dir(ws.test_work, ws.uid, ws.gid, 0o700)
    sandbox.create_overlay_volume(ws.test_volume, [str(ws.upper), str(ws.repo)], str(ws.test_upper),
                                  str(ws.test_work), ws.labels("testview"))


def discard_test_view(sandbox: Deployment, ws: Workspace) -> None:
    sandbox.remove_volume(ws.test_volume)
    for path in (ws.test_upper, ws.test_work):
        if path.exists():
            remove_tree(path)


def release(sandbox: Deployment | None, ws: Workspace) -> None:
    """Unmount-side cleanup only: the job's containers and volumes go, its upper dir stays. ``None``: the
    caller knows none exist (a job awaiting review holds no container or volume)."""
    if sandbox is not None:
        sandbox.remove_job_objects(ws.job_id)


def discard(sandbox: Deployment | None, ws: Workspace) -> None:
    """Roll back: remove every container and volume of the job and its whole job directory."""
    release(sandbox, ws)
    if ws.root.exists():
        remove_tree(ws.root)


def disk_usage(path: Path) -> int:
    """Bytes used under ``path`` (for status); never follows symlinks."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
