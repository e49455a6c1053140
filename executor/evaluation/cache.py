"""The *before* run's cache: the repository's own suite, run once per repository state.

Owns what a repository state is and where its *before* result is kept. A state is known only for a clean
git repository (no change to a tracked file, no untracked file that git does not ignore): its HEAD tree id.
Anything else has no state and is never cached. The key adds the test command and the sandbox image's id,
so a new commit, a changed command or a rebuilt image each mean a new run; entries live under
``$EXECUTOR_HOME/evaluation/before/`` (root's, 0700), the newest ``KEEP`` of them.

git runs as the repository's owner (never as root: the repository's config is the owner's), from the
repository's pinned directory fd, with no system or global config, no fsmonitor and no optional locks.

Must never: run git with root's rights, cache the result of a run that wrote no readable report, or name a
state for a repository that differs from its HEAD.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from .coverage import Coverage
from .junit import Report

KEEP = 200
_TREE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_GIT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_DIR": ".git", "GIT_WORK_TREE": ".", "LC_ALL": "C",
            "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}


def _git(repo_fd: int, uid: int, gid: int, *args: str) -> tuple[str | None, str]:
    """git's output (None when it failed) and, when it failed, why."""
    as_user = {"user": uid, "group": gid, "extra_groups": []} if os.geteuid() == 0 and uid != 0 else {}
    try:
        done = subprocess.run(
            ["git", "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false", *args],
            cwd=f"/proc/self/fd/{repo_fd}", pass_fds=(repo_fd,), env=_GIT_ENV, capture_output=True,
            timeout=120, check=False, **as_user)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"git could not run: {exc}"
    if done.returncode != 0:
        return None, "git: " + done.stderr.decode("utf-8", "replace").strip()[:300]
    return done.stdout.decode("utf-8", "replace"), ""


def repo_state(repo_fd: int, uid: int, gid: int) -> tuple[str | None, str]:
    """The HEAD tree id of the clean git repository open at ``repo_fd`` (None when it is not one), and why
    there is none. git runs as the owner: the path to the repository must be one the owner can walk."""
    status, why = _git(repo_fd, uid, gid, "status", "--porcelain", "-z", "--untracked-files=all")
    if status is None:
        return None, why
    if status:
        return None, "the repository has changes that are not committed"
    tree, why = _git(repo_fd, uid, gid, "rev-parse", "--verify", "--quiet", "HEAD^{tree}")
    tree = (tree or "").strip()
    return (tree, "") if _TREE.match(tree) else (None, why or "no HEAD commit")


class BeforeCache:
    """*Before* results by key, in ``directory``; ``salt`` is what else the result depends on (the image)."""

    def __init__(self, directory: Path, salt: str) -> None:
        self.directory, self.salt = directory, salt

    def key(self, state: str, command: str) -> str:
        return hashlib.sha256(json.dumps([state, command, self.salt]).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> tuple[Report, Coverage | None] | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as fh:
                data = json.load(fh)
            coverage = Coverage.from_json(data["coverage"]) if data.get("coverage") else None
            return Report.from_json(data["report"]), coverage
        except (ValueError, KeyError, TypeError):
            return None  # a torn or old entry: run again

    def store(self, key: str, report: Report, coverage: Coverage | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.directory)  # one per writer
        with os.fdopen(fd, "w") as fh:
            json.dump({"report": report.to_json(), "coverage": coverage.to_json() if coverage else None}, fh)
        os.replace(tmp, self._path(key))
        self._prune()

    def _prune(self) -> None:
        entries = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in entries[KEEP:]:
            stale.unlink(missing_ok=True)
