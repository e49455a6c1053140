"""The *before* run's cache: the repository's own suite, run once per state of the repository's tree.

Owns what a repository state is and where its *before* result is kept. A state is the tree the *before*
run sees, tracked, untracked and ignored files alike (but ``.git``, which the tests' view does not treat as
content): a digest over every entry's path, type and permission bits and, for each non-directory, its size,
modification and change times, inode and device (and a symlink's target). Any write to a file moves its
change time, which no call can set back, so a state is a stricter key than the bytes themselves (the same
bytes written anew are a new state: the safe side) and costs one walk of the tree's metadata, no read of a
file: about 0.1 s for 10,000 files. A tree changing right now (an entry whose times are within
``CLOCK_SLACK_NS`` of the walk: the clock is too coarse to tell two writes apart) or too large to walk
(``MAX_ENTRIES``, ``MAX_DEPTH``) has no state and is never cached. The key adds the test command and the
sandbox image's id, so a changed tree, command or image each mean a new run; entries live under
``$EXECUTOR_HOME/evaluation/before/`` (root's, 0700), the newest ``KEEP`` of them. Nothing here needs git:
a repository that is not one, or is dirty, has its state like any other.

Must never: follow a symlink or descend into another filesystem (the overlay the tests see does not),
read a file's content, cache the result of a run that wrote no readable report, or name a state for a
tree that changed while it was walked.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path

from ..transaction.conflicts import CLOCK_SLACK_NS
from ..transaction.safefs import DIR_FLAGS
from .coverage import Coverage
from .junit import Report

KEEP = 200
#: Trees beyond these are not keyed (their *before* runs every time): the walk's cost and its open
#: directories stay bounded whatever a job or a person put in the repository.
MAX_ENTRIES = 1_000_000
MAX_DEPTH = 256


class _Unkeyed(Exception):
    """Why a tree has no state."""


def tree_state(repo_fd: int) -> tuple[str | None, str]:
    """The state of the tree open at ``repo_fd`` (None when it has none), and why there is none."""
    started = time.time_ns()
    digest = hashlib.sha256()
    root = os.fstat(repo_fd)
    try:
        count = _walk(repo_fd, b"", root.st_dev, started - CLOCK_SLACK_NS, digest, 0)
    except _Unkeyed as why:
        return None, str(why)
    except OSError as exc:
        return None, f"the repository changed while it was read ({exc.strerror})"
    return f"tree:{count}:{digest.hexdigest()}", ""


def _walk(dir_fd: int, prefix: bytes, dev: int, recent: int, digest, count: int) -> int:
    """Hash the entries below ``dir_fd`` in name order, depth first; the number of entries so far."""
    if prefix.count(b"/") >= MAX_DEPTH:
        raise _Unkeyed(f"the repository is deeper than {MAX_DEPTH} directories")
    for name in sorted(os.listdir(dir_fd)):
        if not prefix and name == ".git":
            continue
        count += 1
        if count > MAX_ENTRIES:
            raise _Unkeyed(f"the repository holds more than {MAX_ENTRIES} entries")
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        path = prefix + os.fsencode(name)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"d\0%s\0%o\0" % (path, stat.S_IMODE(st.st_mode)))
            if st.st_dev != dev:
                continue  # a mount inside the repository: the tests' overlay does not show it
            sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                count = _walk(sub, path + b"/", dev, recent, digest, count)
            finally:
                os.close(sub)
            continue
        if max(st.st_mtime_ns, st.st_ctime_ns) >= recent:
            raise _Unkeyed("the repository is changing right now")
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd)) if stat.S_ISLNK(st.st_mode) else b""
        digest.update(b"f\0%s\0%o\0%d\0%d\0%d\0%d\0%d\0%s\0" % (
            path, kind | stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
            st.st_dev, target))
    return count


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
