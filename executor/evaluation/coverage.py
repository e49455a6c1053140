"""Line and branch coverage of a graded test run (coverage.py), and what a test-only job's tests gained.

Owns how a run is measured: an rc file in the run's directory, ``COVERAGE_PROCESS_START`` pointing at it (the
sandbox image starts coverage.py in every ``python3`` process when it is set), and a wrapper that, after the
test command, combines the data and writes ``coverage.json`` with the image's own coverage.py (``python3
-I``: the workspace is not on its path). The exit status stays the test command's. Reading that JSON back is
reading untrusted input: from a pinned fd, size-capped, every value checked. ``gain`` says which lines and
branches of code (not test) files the *after* run covered that the *before* run did not.

Must never: follow a link, read more than ``MAX_REPORT`` bytes, trust a value's type, or count lines of test
files as a gain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import EvaluationError
from ..globs import matching
from ..sandbox.runtime import RUN_DIR_MOUNT
from ..transaction.safefs import as_owner
from ..untrusted import load_json
from .junit import MAX_REPORT, open_file

RC_NAME = "coveragerc"
JSON_NAME = "coverage.json"
WORKSPACE = "/workspace"
MAX_FILES = 50_000

RC_TEXT = f"""[run]
branch = True
parallel = True
relative_files = True
source = {WORKSPACE}
data_file = {RUN_DIR_MOUNT}/coverage-data/.coverage
"""

_WRAPPER = (
    'sh -c "$1"; status=$?; export COVERAGE_PROCESS_START=; '
    f'python3 -I -m coverage combine --rcfile={RUN_DIR_MOUNT}/{RC_NAME} -q >/dev/null 2>&1 '
    f'&& python3 -I -m coverage json --rcfile={RUN_DIR_MOUNT}/{RC_NAME} -i -q -o {RUN_DIR_MOUNT}/{JSON_NAME} '
    '>/dev/null 2>&1; exit $status'
)


@dataclass(frozen=True)
class Coverage:
    """What ran: per file (relative to the repository), the lines and the branches (from, to) executed."""

    lines: dict[str, frozenset[int]]
    arcs: dict[str, frozenset[tuple[int, int]]]

    def to_json(self) -> dict:
        return {"lines": {f: sorted(v) for f, v in self.lines.items()},
                "arcs": {f: sorted(list(a) for a in v) for f, v in self.arcs.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Coverage:
        return cls({f: frozenset(v) for f, v in data.get("lines", {}).items()},
                   {f: frozenset(tuple(a) for a in v) for f, v in data.get("arcs", {}).items()})


def prepare(run_dir_fd: int, uid: int, gid: int) -> dict[str, str]:
    """Write the rc file into a fresh run directory (as its owner); the run's environment."""
    with as_owner(uid, gid):
        fd = os.open(RC_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=run_dir_fd)
        try:
            os.write(fd, RC_TEXT.encode())
        finally:
            os.close(fd)
    return {"COVERAGE_PROCESS_START": f"{RUN_DIR_MOUNT}/{RC_NAME}"}


def wrapped(command: str) -> list[str]:
    """The container command that runs ``command`` and then writes the coverage JSON."""
    return ["sh", "-c", _WRAPPER, "sh", command]


def read(run_dir_fd: int) -> Coverage | None:
    """The coverage a run wrote; None when it wrote none (no Python ran under coverage.py)."""
    fd = open_file(run_dir_fd, JSON_NAME, "coverage report")
    if fd is None:
        return None
    try:
        chunks, size = [], 0
        while size <= MAX_REPORT and (chunk := os.read(fd, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_REPORT:
        raise EvaluationError("the coverage report grew past the size the executor reads: refused")
    raw = b"".join(chunks)
    try:
        data = load_json(raw)  # the test run wrote it: deep nesting is an Unparsable, like bad syntax
        return _checked(data)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise EvaluationError(f"the coverage report is not what coverage.py writes: {str(exc)[:200]}") from None


def _checked(data: object) -> Coverage:
    files = data["files"] if isinstance(data, dict) else None
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise ValueError("no files table, or too many files")
    lines: dict[str, frozenset[int]] = {}
    arcs: dict[str, frozenset[tuple[int, int]]] = {}
    for name, entry in files.items():
        path = _relative(name)
        if path is None or not isinstance(entry, dict):
            continue
        executed = entry.get("executed_lines") or []
        branches = entry.get("executed_branches") or []
        if not all(type(n) is int for n in executed):
            raise ValueError(f"executed_lines of {path} are not line numbers")
        if not all(isinstance(b, list) and len(b) == 2 and all(type(n) is int for n in b) for b in branches):
            raise ValueError(f"executed_branches of {path} are not pairs of line numbers")
        lines[path] = frozenset(executed)
        arcs[path] = frozenset((a, b) for a, b in branches)
    return Coverage(lines, arcs)


def _relative(name: object) -> str | None:
    if not isinstance(name, str) or not name or "\0" in name or len(name) > 1000:
        return None
    if name.startswith(WORKSPACE + "/"):
        name = name[len(WORKSPACE) + 1:]
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/") or any(p in ("", "..") for p in name.split("/")):
        return None
    return name


@dataclass(frozen=True)
class Gain:
    lines: dict[str, list[int]]  # code file -> lines newly covered
    branches: int  # branches newly taken in code files

    @property
    def any(self) -> bool:
        return bool(self.lines) or self.branches > 0

    def to_json(self, limit: int = 50) -> dict:
        shown = dict(sorted(self.lines.items())[:limit])
        return {"lines": sum(len(v) for v in self.lines.values()), "branches": self.branches,
                "files": {f: v[:100] for f, v in shown.items()}}


def gain(before: Coverage, after: Coverage, test_paths: tuple[str, ...] | list[str]) -> Gain:
    """Lines and branches of code files (not matching ``test_paths``) that ``after`` covered and ``before``
    did not."""
    lines: dict[str, list[int]] = {}
    branches = 0
    for path, covered in after.lines.items():
        if matching(path, test_paths):
            continue
        new = covered - before.lines.get(path, frozenset())
        if new:
            lines[path] = sorted(new)
        branches += len(after.arcs.get(path, frozenset()) - before.arcs.get(path, frozenset()))
    return Gain(lines, branches)


def total_lines(cov: Coverage | None, test_paths: tuple[str, ...] | list[str]) -> int | None:
    if cov is None:
        return None
    return sum(len(v) for p, v in cov.lines.items() if not matching(p, test_paths))
