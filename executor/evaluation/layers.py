"""Which of a job's changes are to tests, and the *tests only* layer built from them.

Owns ``split`` (a ``Change`` into its test-path entries and its other entries, by the policy's
``test_paths`` globs) and ``build_tests_layer``: a fresh directory holding only the job's changes to test
files, copied out of its upper dir in the overlay's own format (files, symlinks, directories, whiteouts for
deletions, the opaque mark for a replaced test directory), so that lower = this layer over the repository
shows the old code with the new tests. Nothing of the repository is copied.

Must never: follow a link in the upper dir (every directory is opened from its parent with ``O_NOFOLLOW``,
every file without following), write anything with root's rights (``as_owner``), or write outside the
layer.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvaluationError
from ..globs import matching
from ..transaction.safefs import DIR_FLAGS, as_owner, copy_fd, open_dir_path, remove_tree
from ..transaction.upper import OPAQUE_XATTR, Change, Entry, split_path

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Split:
    """A change as the graded gate sees it."""

    tests: list[Entry]  # changed, added or deleted test paths (and replaced test directories)
    code: list[Entry]  # every other changed path

    @property
    def kind(self) -> str:
        """``none``, ``code`` (no test touched), ``tests`` (only tests: a hardening job) or ``tests_and_code``."""
        if not self.tests:
            return "code" if self.code else "none"
        return "tests_and_code" if self.code else "tests"

    @property
    def test_files(self) -> list[str]:
        return sorted(e.path for e in self.tests if e.kind in ("file", "symlink", "delete"))


def split(change: Change, test_paths: tuple[str, ...] | list[str]) -> Split:
    tests, code = [], []
    for entry in change.entries:
        if entry.kind == "dir":
            continue  # a directory only holds changes; its own entry is no change of content
        (tests if matching(entry.path, test_paths) else code).append(entry)
    return Split(tests, code)


def layer_entries(change: Change, tests: list[Entry]) -> list[Entry]:
    """The entries of the tests-only layer in apply order: the test entries and the directories above them
    (a replaced directory that is not a test path itself becomes a plain one: its code stays as it was)."""
    picked = {e.path for e in tests}
    parents = {"/".join(p.split("/")[:n]) for p in picked for n in range(1, p.count("/") + 1)}
    below_opaque = [e.path + "/" for e in tests if e.kind == "opaque_dir"]
    found = []
    for e in change.entries:
        if e.path in picked or any(e.path.startswith(o) for o in below_opaque):
            found.append(e)
        elif e.path in parents:
            found.append(e._replace(kind="dir"))
    return found


def build_tests_layer(change: Change, tests: list[Entry], upper: Path, layer: Path, uid: int, gid: int,
                      top_mode: int) -> None:
    """Make ``layer`` (fresh, owned by ``uid``) hold the job's test changes, read from ``upper``."""
    if layer.exists() or layer.is_symlink():
        remove_tree(layer)
    os.mkdir(layer, 0o700)
    os.chown(layer, uid, gid)
    os.chmod(layer, top_mode)
    entries = layer_entries(change, tests)
    upper_fd = os.open(upper, DIR_FLAGS)
    try:
        layer_fd = os.open(layer, DIR_FLAGS)
        try:
            dirs = [_place(upper_fd, layer_fd, e, uid, gid) for e in entries]
            # Directory modes last, deepest first: a directory the agent made read-only still gets its files.
            with as_owner(uid, gid):
                for entry in reversed([e for e, d in zip(entries, dirs) if d]):
                    fd = open_dir_path(layer_fd, split_path(entry.path))
                    try:
                        os.fchmod(fd, stat.S_IMODE(entry.mode) & 0o777)
                    finally:
                        os.close(fd)
        finally:
            os.close(layer_fd)
    except OSError as exc:
        raise EvaluationError(f"the tests-only layer could not be built: {exc}") from None
    finally:
        os.close(upper_fd)


def _place(upper_fd: int, layer_fd: int, entry: Entry, uid: int, gid: int) -> bool:
    """Put one entry into the layer; True when it is a directory (its mode is set at the end)."""
    parts = split_path(entry.path)
    name = parts[-1]
    upper_parent = open_dir_path(upper_fd, parts[:-1])
    try:
        layer_parent = open_dir_path(layer_fd, parts[:-1])
        try:
            return _place_at(upper_parent, layer_parent, name, entry, uid, gid)
        finally:
            os.close(layer_parent)
    finally:
        os.close(upper_parent)


def _place_at(upper_parent: int, layer_parent: int, name: str, entry: Entry, uid: int, gid: int) -> bool:
    if entry.kind == "file":
        src = os.open(name, _READ, dir_fd=upper_parent)  # read with root's rights: the agent may chmod 000
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode) or (entry.ino and st.st_ino != entry.ino):
                raise EvaluationError(f"{entry.path} changed in the upper dir while the tests-only layer was built")
            with as_owner(uid, gid):
                dst = os.open(name, _CREATE, 0o600, dir_fd=layer_parent)
                try:
                    copy_fd(src, dst)
                    os.fchmod(dst, stat.S_IMODE(entry.mode) & 0o777)
                finally:
                    os.close(dst)
        finally:
            os.close(src)
        return False
    with as_owner(uid, gid):
        if entry.kind == "symlink":
            os.symlink(os.readlink(name, dir_fd=upper_parent), name, dir_fd=layer_parent)
        elif entry.kind == "delete":
            # An overlay whiteout: a 0/0 character device (the kernel lets anyone make exactly this one).
            os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=layer_parent)
        else:
            os.mkdir(name, 0o700, dir_fd=layer_parent)
            if entry.kind == "opaque_dir":
                fd = os.open(name, DIR_FLAGS, dir_fd=layer_parent)
                try:
                    os.setxattr(fd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(fd)
            return True
    return False
