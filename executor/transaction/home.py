"""The session home as part of the transaction: what a job writes into ``$HOME`` is kept only if it commits.

Owns the session's *committed* home (``$EXECUTOR_HOME/sessions/<session>/home``: never mounted writable)
and each attempt's home layer (``jobs/<id>/home/upper``): the agent's home is an overlay whose lower dir
is the committed home, so the agent's transcripts, settings and dotfiles land in the attempt's layer.
When the job commits, the paths its policy's ``session_carry`` allows (by default only the agent's
conversation transcripts, which resuming needs: each agent names them) are merged into the committed home;
everything else,
and everything of a job that does not commit, goes with the job's directory. A rate-limited attempt keeps
its layer until it resumes. So hooks, ``settings.json``, shell rc files and shell snapshots never reach the
next job unless a policy names them. Also reading an agent's transcript to see whether it can be resumed
(``transcript_readable``: where it lies is the agent's to say).

Must never: carry a symlink, a device or anything the policy does not name into the committed home, follow
a link the agent planted, or write the committed home with root's rights.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from ..globs import matching_files
from ..untrusted import load_json
from .apply import apply_change
from .safefs import DIR_FLAGS, lstat_at, open_dir_path
from .tree import Tree
from .upper import Change, Entry, scan_upper

TRANSCRIPT_LIMIT = 256 * 2**20  # a transcript read to check it resumes; a bigger one is judged on its start
#: Entries of one directory looked at while searching for a transcript (the agent wrote them).
_LISTED = 10_000


def prepare_committed(home: Path, uid: int, gid: int) -> None:
    """The committed home exists, belongs to the agent's uid and is private (the overlay's lower dir)."""
    home.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(home.parent, 0o711)
    try:
        os.mkdir(home, 0o700)
    except FileExistsError:
        pass
    fd = os.open(home, DIR_FLAGS)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def carry(home_upper: Path, committed: Path, patterns: tuple[str, ...] | list[str], uid: int, gid: int) -> list[str]:
    """Merge what ``patterns`` allow of an attempt's home layer into the committed home; the paths carried."""
    if not home_upper.is_dir():
        return []
    change = _allowed(scan_upper(home_upper), patterns)
    if not change.entries:
        return []
    fd = os.open(committed, DIR_FLAGS)
    try:
        apply_change(change, home_upper, fd, uid, gid)  # copies, as the owner
    finally:
        os.close(fd)
    return change.changed_files


def _allowed(change: Change, patterns) -> Change:
    """Regular, non-executable files and deletions the patterns name by their own path, with the plain
    directories above them; never a symlink, an executable, a special file, a replaced directory, anything
    below a directory that merely has a matching name, or anything the scan refused."""
    picked = [e for e in change.entries if _carried(e) and matching_files(e.path, patterns)]
    parents = {"/".join(e.path.split("/")[:n]) for e in picked for n in range(1, e.path.count("/") + 1)}
    dirs = [Entry(e.path, "dir", e.mode & 0o700 or 0o700) for e in change.entries
            if e.kind in ("dir", "opaque_dir") and e.path in parents]
    order = {e.path: i for i, e in enumerate(change.entries)}
    return Change(entries=sorted(dirs + picked, key=lambda e: order[e.path]))


def _carried(entry: Entry) -> bool:
    if entry.kind == "delete":
        return True
    return entry.kind == "file" and not entry.mode & 0o111  # "file": a regular file (the scan's kinds)


def transcript_readable(tops: list[Path], parts: list[str]) -> bool:
    """Whether an agent's transcript is in one of ``tops`` (an attempt's home layer, the committed home) and
    parses as JSON lines; else a resume starts fresh. ``parts``: its path below a home, one ``fnmatch`` pattern
    per component (the last names the file), e.g. ``[".tool", "sessions", "*", "rollout-*-ID.jsonl"]``. Read
    through pinned fds, never following a link; the first match decides."""
    for top in tops:
        try:
            top_fd = os.open(top, DIR_FLAGS)
        except OSError:
            continue
        try:
            found = _search(top_fd, parts)
        finally:
            os.close(top_fd)
        if found is not None:
            return found
    return False


def _search(dir_fd: int, parts: list[str]) -> bool | None:
    """The verdict on the first file below ``dir_fd`` matching ``parts``; None when there is none."""
    pattern, rest = parts[0], parts[1:]
    names = [pattern] if not _wild(pattern) else sorted(fnmatch.filter(_listing(dir_fd), pattern))
    for name in names:
        st = lstat_at(dir_fd, name)
        if st is None:
            continue
        if not rest:
            if stat.S_ISREG(st.st_mode):
                return _parses(Tree(dir_fd).read(name, TRANSCRIPT_LIMIT))
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            sub = open_dir_path(dir_fd, [name])
        except OSError:
            continue
        try:
            found = _search(sub, rest)
        finally:
            os.close(sub)
        if found is not None:
            return found
    return None


def _wild(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _listing(dir_fd: int) -> list[str]:
    try:
        with os.scandir(dir_fd) as entries:
            return [entry.name for _, entry in zip(range(_LISTED), entries)]
    except OSError:
        return []


def _parses(data: bytes | None) -> bool | None:
    if data is None:
        return None
    lines = data.decode("utf-8", "replace").splitlines()
    try:
        return bool(lines) and all(load_json(line) is not None for line in lines if line.strip())
    except ValueError:  # Unparsable, deep nesting included: the agent wrote this file
        return False
