"""The job's workspace: an overlayfs view of the repository whose upper directory *is* the transaction.

Owns the on-disk layout of ``$EXECUTOR_HOME/jobs/<id>/`` and the overlay volumes built on it: the agent's
view (lower = the repository, upper = ``layers/upper/``) and the test view (lower = the job's upper dir
over the repository, upper = a throwaway ``layers/test-upper/``), so tests see exactly what would be
committed and cannot change it. Every layer a job writes lies in ``layers/``, the job's disk of its policy's
``disk`` size (``jobdisk.py``); the commit's journal and a sealed job's sockets lie beside it. Setting up
copies nothing; its cost does not grow with the repository.

The repository is reached only beneath its workspace root with no symlink on the way, and must still be
the directory intake accepted (device, inode, owner): a workspace swapped while a job ran fails the job
(``WorkspaceChanged``) before anything is mounted or written.

Must never: write into the repository (committing is ``commit.py``), follow a symlink to the repository,
or leave a volume behind on discard.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import WorkspaceChanged
from ..sandbox.deployment import LABEL_ATTEMPT, LABEL_JOB, LABEL_ROLE, Deployment
from ..settings import Settings
from ..store import Job
from . import jobdisk
from .home import prepare_committed
from .safefs import DIR_FLAGS, Identity, open_beneath, remove_tree
from .tree import Tree


def root_of(roots: list[Path], path: Path) -> Path | None:
    """The workspace root ``path`` lies under (lexically: ``path`` is normalized, the roots resolved)."""
    for root in roots:
        if path == root or root in path.parents:
            return root
    return None


def open_identity(root: Path, path: Path) -> Identity:
    """The identity of the directory ``path`` reached beneath ``root`` without symlinks (OSError if not)."""
    fd = open_beneath_root(root, path)
    try:
        return Identity.of(fd)
    finally:
        os.close(fd)


def open_beneath_root(root: Path, path: Path) -> int:
    """The directory ``path``, reached beneath ``root`` without symlinks (OSError if not)."""
    # The root is the person's configuration (trusted, opened by name); below it no link is followed.
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_beneath(root_fd, str(path.relative_to(root)))
    finally:
        os.close(root_fd)


@dataclass(frozen=True)
class Workspace:
    job_id: str
    attempt: int
    repo: Path
    root: Path  # $EXECUTOR_HOME/jobs/<id>
    uid: int
    gid: int
    roots: tuple[Path, ...] = ()  # EXECUTOR_WORKSPACE_ROOTS
    identity: Identity | None = None  # the repository as intake accepted it
    home: Path | None = None  # the session's committed home (the lower dir of the agent's home)
    git_author: str = "executor <executor@localhost>"  # EXECUTOR_GIT_AUTHOR: who commits a change landed in git

    def open_repo(self) -> int:
        """The repository's directory fd, reached beneath its root with no symlink on the way, and still the
        directory intake accepted. Raises ``WorkspaceChanged`` otherwise; nothing has been touched then."""
        root = root_of(list(self.roots), self.repo) if self.roots else None
        try:
            fd = open_beneath_root(root, self.repo) if root is not None else os.open(self.repo, DIR_FLAGS)
        except OSError as exc:
            raise WorkspaceChanged(f"the workspace {self.repo} cannot be reached as it was when the job was accepted "
                                   f"({exc.strerror}: a symlink, a file or nothing on its path); nothing was "
                                   "written") from None
        found = Identity.of(fd)
        if self.identity is not None and found != self.identity:
            os.close(fd)
            raise WorkspaceChanged(f"the workspace {self.repo} is no longer the directory the job was accepted with "
                                   f"(was {self.identity}, now {found}); nothing was written")
        return fd

    @property
    def layers(self) -> Path:
        """Every layer the job writes: the mount point of its disk image, or a plain directory the watchdog
        measures (``jobdisk.py``)."""
        return self.root / jobdisk.LAYERS

    @property
    def upper(self) -> Path:
        return self.layers / "upper"

    @property
    def work(self) -> Path:
        return self.layers / "work"

    @property
    def test_upper(self) -> Path:
        return self.view_upper("test")

    def view_upper(self, view: str) -> Path:
        """The throwaway layer of a test view (``VIEWS``): what its tests write, never committed."""
        return self.layers / f"{view}-upper"

    def view_work(self, view: str) -> Path:
        return self.layers / f"{view}-work"

    def view_volume(self, view: str) -> str:
        return f"executor-{self.job_id}-a{self.attempt}-{view}"

    @property
    def tests_layer(self) -> Path:
        """The graded gate's layer holding only the job's changes to test files (``evaluation/layers.py``)."""
        return self.layers / "tests-layer"

    @property
    def runs_dir(self) -> Path:
        """One directory per graded test run, bind-mounted into its container for the report it writes."""
        return self.layers / "runs"

    @contextmanager
    def trees(self) -> Iterator[tuple[Tree, Tree]]:
        """Read-only views of the upper dir and of the repository (``WorkspaceChanged`` if it is not the one
        the job started on), for as long as the block runs."""
        repo_fd = self.open_repo()
        try:
            upper_fd = os.open(self.upper, DIR_FLAGS)
        except BaseException:
            os.close(repo_fd)
            raise
        try:
            yield Tree(upper_fd), Tree(repo_fd)
        finally:
            os.close(upper_fd)
            os.close(repo_fd)

    @property
    def home_upper(self) -> Path:
        """The attempt's layer of the agent's home: kept only if the job commits (``home.py``)."""
        return self.layers / "home" / "upper"

    @property
    def home_work(self) -> Path:
        return self.layers / "home" / "work"

    @property
    def home_volume(self) -> str:
        return f"executor-{self.job_id}-a{self.attempt}-home"

    @property
    def journal(self) -> Path:
        """The commit's journal (in the job dir, which only root can write)."""
        return self.root / "commit-journal.json"

    @property
    def agent_config(self) -> Path:
        """The agent's configuration files of this attempt (root's, read-only in the container)."""
        return self.root / "agent"

    @property
    def sockets(self) -> Path:
        """A sealed attempt's socket directory (bind-mounted into its agent container)."""
        return self.root / "sock"

    @property
    def volume(self) -> str:
        return f"executor-{self.job_id}-a{self.attempt}"

    def labels(self, role: str) -> dict[str, str]:
        return {LABEL_JOB: self.job_id, LABEL_ATTEMPT: str(self.attempt), LABEL_ROLE: role}

    @classmethod
    def of(cls, settings: Settings, job: Job, attempt: int | None = None) -> Workspace:
        """The workspace of ``job``'s attempt (its latest by default)."""
        identity = None
        if job.workspace_ino is not None:
            identity = Identity(job.workspace_dev, job.workspace_ino, job.repo_uid, job.repo_gid)
        return cls(job_id=job.id, attempt=job.attempts if attempt is None else attempt, repo=Path(job.workspace),
                   root=settings.job_dir(job.id), uid=job.repo_uid or 1000, gid=job.repo_gid or 1000,
                   roots=tuple(settings.workspace_roots), identity=identity,
                   home=settings.sessions_dir / job.session_id / "home", git_author=settings.git_author)


def _fresh_dir(path: Path, uid: int, gid: int, mode: int) -> None:
    if path.exists() or path.is_symlink():
        remove_tree(path)
    path.mkdir(parents=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def create(sandbox: Deployment, ws: Workspace, keep_upper: bool = False, disk: int | None = None) -> None:
    """The job's layers (a disk image of ``disk`` bytes; None: a plain directory), upper/work dirs owned by
    the agent's uid and the agent's overlay volume.

    ``keep_upper``: continue on the layers an earlier attempt left (a retry after a rate limit resumes
    the conversation that knows that state); otherwise start from the clean repository.
    """
    repo_mode = _repo_mode(ws)
    jobdisk.prepare(ws.root, disk, keep=keep_upper)
    # The merged root takes owner and mode from upper: give it the repository root's.
    if not (keep_upper and ws.upper.is_dir()):
        _fresh_dir(ws.upper, ws.uid, ws.gid, repo_mode)
    _fresh_dir(ws.work, ws.uid, ws.gid, 0o700)  # overlay needs an empty work dir for every mount
    sandbox.create_overlay_volume(ws.volume, [str(ws.repo)], str(ws.upper), str(ws.work), ws.labels("workspace"))
    if ws.home is not None:
        _create_home(sandbox, ws, keep_upper)


def take_over(base: Path, ws: Workspace) -> bool:
    """Move the kept change in the job directory ``base`` into ``ws`` as its upper dir: a reviewer's
    follow-up continues the reviewed job's change. Its disk image is handed over whole (renamed on the
    state root's file system, and mounted here); without one, its upper dir is renamed. Nothing is copied:
    whiteouts and owners stay as the agent made them. True when ``ws`` has its change (taken now, or by an
    earlier attempt); False when there is none to take."""
    jobdisk.attach(ws.root)
    if ws.upper.is_dir() and not ws.upper.is_symlink():
        return True
    if jobdisk.hand_over(base, ws.root):
        return ws.upper.is_dir()
    source = base / jobdisk.LAYERS / "upper"
    if not source.is_dir() or source.is_symlink():
        return False
    jobdisk.prepare(ws.root, None, keep=False)
    os.rename(source, ws.upper)
    return True


def _create_home(sandbox: Deployment, ws: Workspace, keep_upper: bool) -> None:
    """The agent's home: the session's committed home below the attempt's own layer."""
    prepare_committed(ws.home, ws.uid, ws.gid)
    (ws.layers / "home").mkdir(exist_ok=True)
    os.chmod(ws.layers / "home", 0o711)
    if not (keep_upper and ws.home_upper.is_dir()):
        _fresh_dir(ws.home_upper, ws.uid, ws.gid, 0o700)
    _fresh_dir(ws.home_work, ws.uid, ws.gid, 0o700)
    sandbox.create_overlay_volume(ws.home_volume, [str(ws.home)], str(ws.home_upper), str(ws.home_work),
                                  ws.labels("home"))


def _repo_mode(ws: Workspace) -> int:
    """The repository root's mode, from the directory intake accepted (``WorkspaceChanged`` if it is not)."""
    fd = ws.open_repo()
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)


#: The test views: ``test`` (the job's changes over the repository: the gate), and the graded gate's
#: ``before`` (the repository alone) and ``tests`` (only the job's changes to test files over the repository).
VIEWS = ("test", "before", "tests")


def create_test_view(sandbox: Deployment, ws: Workspace, view: str = "test", lower: list[Path] | None = None) -> None:
    """A throwaway layer above ``lower`` (by default the job's changes over the repository): what the tests
    write is never committed, and nothing below it is copied."""
    repo_mode = _repo_mode(ws)  # the repository must still be the one the job started on
    lower = lower if lower is not None else [ws.upper, ws.repo]
    top_mode = repo_mode if lower[0] == ws.repo else os.stat(lower[0]).st_mode & 0o777
    _fresh_dir(ws.view_upper(view), ws.uid, ws.gid, top_mode)
    _fresh_dir(ws.view_work(view), ws.uid, ws.gid, 0o700)
    sandbox.create_overlay_volume(ws.view_volume(view), [str(p) for p in lower], str(ws.view_upper(view)),
                                  str(ws.view_work(view)), ws.labels("testview"))


def fresh_run_dir(ws: Workspace, name: str) -> Path:
    """An empty directory of the agent's uid for one graded test run (its report), in the root-owned runs dir:
    the run cannot swap the directory itself, only what lies in it."""
    ws.runs_dir.mkdir(exist_ok=True)
    os.chmod(ws.runs_dir, 0o711)
    path = ws.runs_dir / name
    _fresh_dir(path, ws.uid, ws.gid, 0o700)
    return path


def discard_view(sandbox: Deployment, ws: Workspace, view: str) -> None:
    paths = [p for p in (ws.view_upper(view), ws.view_work(view)) if p.exists() or p.is_symlink()]
    if not paths:
        return  # never made: its dirs come before its volume, and go after it
    sandbox.remove_volume(ws.view_volume(view))
    for path in paths:
        remove_tree(path)


def discard_test_view(sandbox: Deployment, ws: Workspace) -> None:
    """Every test view, the graded gate's tests layer and its run directories."""
    for view in VIEWS:
        discard_view(sandbox, ws, view)
    for path in (ws.tests_layer, ws.runs_dir):
        if path.exists() or path.is_symlink():
            remove_tree(path)


def release(sandbox: Deployment | None, ws: Workspace) -> None:
    """Unmount-side cleanup only: the job's containers and volumes go, its layers stay (on their disk image,
    mounted). ``None``: the caller knows none exist (a job awaiting review holds no container or volume)."""
    if sandbox is not None:
        sandbox.remove_job_objects(ws.job_id)


def discard(sandbox: Deployment | None, ws: Workspace) -> None:
    """Roll back: remove every container and volume of the job (they hold its layers), then its whole job
    directory (its disk image unmounted first)."""
    release(sandbox, ws)
    jobdisk.remove(ws.root)


def reattach(ws: Workspace) -> None:
    """Mount the job's disk image again where it is not mounted (after a reboot, before the executor
    recovered): the kept change is then where ``ws.upper`` says. ``DiskImageError`` when it cannot be."""
    jobdisk.attach(ws.root)


def write_agent_config(ws: Workspace, files: dict[str, bytes]) -> Path | None:
    """The attempt's agent configuration files (``Launch.files``: plain names, no credential) in a fresh
    root-owned directory the container mounts read-only; None when the agent needs none."""
    directory = ws.agent_config
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory)
    if not files:
        return None
    directory.mkdir(mode=0o755)
    for name, data in files.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"an agent configuration file is named by a plain name, not {name!r}")
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return directory
