"""Landing a job's change in git (policy ``land``): a commit on the current branch, or a branch of its own.

Owns the git step of a commit and its place in the commit's journal. ``begin`` records, when an attempt
starts from the repository, where HEAD is (its branch, and the commit the job starts from). ``prepare``
builds the job's change as a commit *J* on a base (``branch``: the HEAD the job started from; ``commit``:
the branch's commit now) from the change's bytes in the upper dir, in a temporary index read from the base
(``fast-import`` for the blobs, ``update-index --index-info``, ``write-tree``, ``commit-tree``): only the
job's paths, none that git ignores (unless tracked), none inside a submodule. Nothing visible moves: J is
an object no ref names yet. Its plan (the ref, the base, J, the commit the ref is to get, how far it got)
goes into the journal before the working tree is touched. ``finish`` then (again after a crash: every step
may run twice) brings the index to the commit at the job's paths (``commit`` only: other staged or dirty
paths stay as they were) and moves the ref with a compare-and-swap ``update-ref``. A ref that holds the
commit already, or moved on from it, is done (never a second commit); a branch the person moved meanwhile
gets the change rebuilt on its new tip (never a lost one). ``land`` plans the same for a branch job's commit
onto the branch checked out now (``executor land``).

Must never: move a branch other than the one the job started on (``commit``) or its own ``executor/<id>``
(``branch``), touch the working tree or the index in ``branch`` mode, commit a path outside the change, or
run git but through ``git.Git``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import GitError, UnsafePath
from ..policy import Policy
from ..store import Job, Store
from .git import Git, Head
from .gitignore import Ignored
from .gitmessage import message, parse_author
from .journal import Plan, save
from .safefs import DIR_FLAGS, open_dir_path
from .tree import Tree
from .upper import Change, Entry, is_git_path, split_path
from .workspace import Workspace

BRANCH_PREFIX = "executor/"
#: How often a branch that keeps moving under the landing is tried again.
TRIES = 5
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Landing:
    """A landing's plan, as the journal keeps it. ``change`` is the job's commit J (on ``base``); ``commit``
    is what ``ref`` gets (J itself, or J rebuilt on ``parent``); None: nothing to commit (``note`` says why)."""

    mode: str
    ref: str
    base: str | None
    change: str | None
    parent: str | None
    commit: str | None
    author: list[str]
    date: str
    stage: str = "built"  # built -> indexed (commit mode: the index holds it) -> done (the ref holds it)
    note: str | None = None

    @property
    def branch(self) -> str:
        return self.ref.removeprefix("refs/heads/")

    def record(self, start: dict | None) -> dict:
        """What the job's row keeps of it (``Job.git``): where the job started and where its change is."""
        return {**(start or {}), "mode": self.mode, "branch": self.branch, "commit": self.commit,
                "parent": self.parent, "note": self.note}


def branch_of(job_id: str) -> str:
    return BRANCH_PREFIX + job_id


def check_head(git: Git, mode: str, where: Path | str) -> Head:
    """HEAD, if a landing of ``mode`` may start from it; ``GitError`` saying what is in the way."""
    try:
        head = git.head()
    except GitError as exc:
        raise GitError(f"{where} is not a git repository that git can use ({exc}); land = \"{mode}\" needs one: "
                       "run `git init` there (as its owner), or use land = \"files\"") from None
    if mode == "commit" and head.underway:
        raise GitError(f"{where} is in the middle of {head.underway}: finish or abort it first (land = \"commit\" "
                       "commits on the current branch)")
    if mode == "commit" and head.ref is None:
        raise GitError(f"{where} has a detached HEAD: check out the branch the job is to commit on (a job never "
                       "moves a branch it was not given), or use land = \"branch\"")
    return head


def begin(store: Store, job: Job, ws: Workspace, keep: bool) -> None:
    """Record where HEAD is as the attempt starts from the repository (``keep``: it continues a change made
    earlier, whose start stays the one recorded). ``GitError`` when the policy's landing cannot start here."""
    mode = Policy(**job.policy).land
    if mode == "files" or (keep and (job.git or {}).get("mode") == mode):
        return
    repo_fd = ws.open_repo()
    try:
        head = check_head(Git(repo_fd, ws.uid, ws.gid), mode, ws.repo)
    finally:
        os.close(repo_fd)
    job.git = {"mode": mode, "ref": head.ref, "base": head.commit}
    store.update_job(job.id, git=job.git)


def prepare(job: Job, ws: Workspace, change: Change, repo_fd: int) -> Landing | None:
    """The landing of ``change`` (None: ``land = "files"``), its commit built and nothing visible moved."""
    mode = Policy(**job.policy).land
    if mode == "files":
        return None
    git = Git(repo_fd, ws.uid, ws.gid)
    start = job.git or {}
    if mode == "commit":
        head = check_head(git, mode, ws.repo)
        if start.get("ref") and head.ref != start["ref"]:
            raise GitError(f"{ws.repo} has {head.branch} checked out now; the job started on "
                           f"{start['ref'].removeprefix('refs/heads/')}: nothing was applied (a job never commits "
                           "on a branch it was not given)")
        ref, base = head.ref, head.commit
    else:
        ref, base = "refs/heads/" + branch_of(job.id), start.get("base")
        if not git.valid_branch(branch_of(job.id)):
            raise GitError(f"{branch_of(job.id)} is not a name git takes for a branch: give the job an id "
                           "without '..', '.lock' or a trailing '.'")
    author = list(parse_author(ws.git_author))
    date = f"{int(time.time())} +0000"
    commit, note = build(git, change, ws, repo_fd, base, message(job), author, date)
    return Landing(mode, ref, base, commit, base, commit, author, date, note=note)


def build(git: Git, change: Change, ws: Workspace, repo_fd: int, base: str | None, text: str,
          author: list[str], date: str) -> tuple[str | None, str | None]:
    """The commit of ``change`` (read from the upper dir) on ``base``, or None when git keeps nothing of it;
    and what was left out, in words."""
    upper_fd = os.open(ws.upper, DIR_FLAGS)
    try:
        with git.temp_index() as env:
            git.run("read-tree", base or "--empty", env=env)
            adds, removals, left_out = _sorted_out(git, env, change, Ignored(change, Tree(upper_fd), Tree(repo_fd)))
            ids = git.store_blobs(_contents(upper_fd, adds))
            git.update_index([("0", "", p) for p in removals]
                             + [(_mode(e), oid, e.path) for e, oid in zip(adds, ids)], env)
            tree = git.out("write-tree", env=env)
    finally:
        os.close(upper_fd)
    note = ("left out of the commit: " + "; ".join(left_out)) if left_out else None
    if tree == git.tree_of(base):
        return None, "nothing to commit: " + (note or "the change holds no file git tracks")
    return git.commit_tree(tree, base, text, (author[0], author[1]), date), note


def _sorted_out(git: Git, env: dict, change: Change, ignored: Ignored) -> tuple[list[Entry], list[str], list[str]]:
    """(entries to add, tracked paths to remove, what was left out in words) for ``change`` over the index."""
    # nothing under a .git directory ever reaches a commit (scan_upper sets it aside already; git refuses it)
    files = {e.path: e for e in change.entries if e.kind in ("file", "symlink") and not is_git_path(e.path.split("/"))}
    gone = {e.path for e in change.entries if e.kind in ("delete", "opaque_dir")}
    tracked, gitlinks, removals = set(), [], []
    for mode, path in git.index_entries(env):
        if mode == "160000":
            gitlinks.append(path)
        if path in files:
            tracked.add(path)
        if gone and any("/".join(path.split("/")[:n]) in gone for n in range(1, path.count("/") + 2)):
            removals.append(path)
    adds, skipped, inside = [], [], []
    for path, entry in files.items():
        if any(path.startswith(g + "/") for g in gitlinks):
            inside.append(path)
        elif path in tracked or not ignored(path):
            adds.append(entry)
        else:
            skipped.append(path)
    left_out = []
    if skipped:
        left_out.append(f"{len(skipped)} path(s) git ignores ({_listed(skipped)})")
    if inside:
        left_out.append(f"{len(inside)} path(s) inside a submodule ({_listed(inside)})")
    return adds, removals, left_out


def _listed(paths: list[str]) -> str:
    return ", ".join(sorted(paths)[:5]) + (" ..." if len(paths) > 5 else "")


def _mode(entry: Entry) -> str:
    if entry.kind == "symlink":
        return "120000"
    return "100755" if entry.mode & 0o100 else "100644"


def _contents(upper_fd: int, entries: list[Entry]) -> Iterator[tuple[int, Iterator[bytes]]]:
    """Each entry's bytes as git stores them (a file's content, a symlink's target), read without following
    a link, the file checked to be the one the job wrote."""
    for entry in entries:
        parts = split_path(entry.path)
        parent = open_dir_path(upper_fd, parts[:-1])
        try:
            if entry.kind == "symlink":
                target = os.fsencode(os.readlink(parts[-1], dir_fd=parent))
                yield len(target), iter([target])
                continue
            fd = os.open(parts[-1], _READ, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (entry.ino and st.st_ino != entry.ino):
                raise UnsafePath(f"upper entry {entry.path!r} is no longer the file the job wrote")
            yield st.st_size, _read(fd, st.st_size)
        finally:
            os.close(fd)


def _read(fd: int, size: int) -> Iterator[bytes]:
    left = size
    while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
        left -= len(chunk)
        yield chunk


# -- finishing ---------------------------------------------------------------------------------------------


def finish(git: Git, landing: Landing, journal: Path | None, plan: Plan | None) -> Landing:
    """Make the ref hold the landing's commit (the index too, in ``commit`` mode); each step recorded in
    the journal as it is done, so a crash at any point is finished by running this again."""
    def saved(step: Landing) -> None:
        if plan is not None:
            plan.git = asdict(step)
            save(journal, plan)

    if landing.commit is not None and landing.stage != "done":
        landing = _finish_branch(git, landing) if landing.mode == "branch" else _finish_commit(git, landing, saved)
    landing.stage = "done"
    saved(landing)
    return landing


def _finish_branch(git: Git, landing: Landing) -> Landing:
    found = git.rev(landing.ref)
    if found is None and git.update_ref(landing.ref, landing.commit, None):
        return landing
    found = git.rev(landing.ref)
    if found is not None and (found == landing.commit or git.is_ancestor(landing.commit, found)):
        return landing  # made before a crash (and perhaps built on since)
    raise GitError(f"a branch {landing.branch} exists already and does not hold this job's commit "
                   f"{landing.commit}: delete or rename it, then finish the commit")


def _finish_commit(git: Git, landing: Landing, saved) -> Landing:
    for _ in range(TRIES):
        head = git.head()
        if head.ref != landing.ref:
            raise GitError(f"HEAD is no longer on {landing.branch} ({head.branch or 'detached'} now): the job's "
                           "change is in the working tree, but no commit was made; commit it by hand")
        now = head.commit
        if now is not None and (now == landing.commit or git.is_ancestor(landing.commit, now)):
            if landing.stage == "built" and now == landing.commit:
                git.update_index(git.diff_tree(landing.parent, landing.commit))
            return landing  # the ref took it before a crash
        if now != landing.parent:  # the branch moved since the plan: the change goes on its new tip
            landing = rebuilt(git, landing, now)
            saved(landing)
            if landing.commit is None:
                return landing
        if landing.stage == "built":
            git.update_index(git.diff_tree(landing.parent, landing.commit))
            landing.stage = "indexed"
            saved(landing)
        if git.update_ref(landing.ref, landing.commit, landing.parent):
            return landing
    raise GitError(f"{landing.branch} kept moving while the job's commit was put on it ({TRIES} tries): the "
                   "change is in the working tree; commit it by hand")


def rebuilt(git: Git, landing: Landing, onto: str | None) -> Landing:
    """The landing with the job's commit J rebuilt on ``onto`` (same tree changes, message, author and date);
    commit None when ``onto`` holds the change already."""
    with git.temp_index() as env:
        git.run("read-tree", onto or "--empty", env=env)
        git.update_index(git.diff_tree(landing.base, landing.change), env)
        tree = git.out("write-tree", env=env)
    if tree == git.tree_of(onto):
        return Landing(**{**asdict(landing), "parent": onto, "commit": None, "stage": "built",
                          "note": f"nothing to commit: {landing.branch} holds the change already"})
    text = git.run("cat-file", "commit", landing.change)[1].decode("utf-8", "surrogateescape").split("\n\n", 1)[1]
    commit = git.commit_tree(tree, onto, text, (landing.author[0], landing.author[1]), landing.date)
    return Landing(**{**asdict(landing), "parent": onto, "commit": commit, "stage": "built"})


def land_plan(git: Git, job: Job, head: Head) -> Landing:
    """The landing of a branch job's commit onto the branch checked out now (``executor land``)."""
    record = job.git or {}
    change = record.get("commit")
    landing = Landing("commit", head.ref, record.get("base"), change, head.commit, change,
                      [], "", note=None)
    text = git.run("cat-file", "commit", change)[1].decode("utf-8", "surrogateescape")
    author = next(line for line in text.split("\n") if line.startswith("author "))
    who, _, when = author.removeprefix("author ").rpartition("> ")
    name, _, email = who.partition(" <")
    landing.author, landing.date = [name, email], when
    if head.commit != landing.base:
        landing = rebuilt(git, landing, head.commit)
    return landing
