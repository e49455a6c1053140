"""Reading the JUnit XML report a test run wrote: per-test outcomes, from input the agent controls.

Owns ``read_report`` (a report in a run's directory, opened from its pinned fd without following a link,
refused above ``MAX_REPORT`` bytes before it is read) and ``parse`` (defusedxml's streaming parser with every
DTD, entity and external reference refused, a depth limit and a test-count limit; each test case is dropped
from memory once its outcome is known). A test's id is ``classname::name`` (pytest: ``tests.test_calc::
test_add``); a test named twice keeps its worst outcome.

Must never: follow a symlink, read more than ``MAX_REPORT`` bytes, expand an entity or fetch anything a
report names, or turn a missing or broken report into a pass (broken raises ``EvaluationError``; missing is
``None`` and the caller decides).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from ..errors import EvaluationError
from ..settings import human_size

#: The largest report read: a suite of 100k tests writes about 15 MiB.
MAX_REPORT = 32 * 2**20
#: JUnit nests testsuites/testsuite/testcase/failure: anything deeper than this is not a report.
MAX_DEPTH = 32
MAX_TESTS = 200_000
MAX_ID = 500
#: Outcomes, best first; a test reported twice keeps the later one in this order.
OUTCOMES = ("passed", "skipped", "failed", "error")
FAILING = frozenset({"failed", "error"})
_CHILD_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}


@dataclass
class Report:
    """What one run's report says: test id -> outcome, and the file a test is in when the report says."""

    outcomes: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def add(self, test: str, outcome: str, file: str | None = None) -> None:
        known = self.outcomes.get(test)
        if known is None or OUTCOMES.index(outcome) > OUTCOMES.index(known):
            self.outcomes[test] = outcome
        if file:
            self.files[test] = file

    def with_outcome(self, *outcomes: str) -> set[str]:
        return {t for t, o in self.outcomes.items() if o in outcomes}

    def counts(self) -> dict[str, int]:
        found = {o: 0 for o in OUTCOMES}
        for outcome in self.outcomes.values():
            found[outcome] += 1
        return found

    def to_json(self) -> dict:
        return {"outcomes": self.outcomes, "files": self.files}

    @classmethod
    def from_json(cls, data: dict) -> Report:
        outcomes = {str(k): str(v) for k, v in (data.get("outcomes") or {}).items() if v in OUTCOMES}
        return cls(outcomes, {str(k): str(v) for k, v in (data.get("files") or {}).items()})


class _Capped:
    """A read-only stream over an fd that refuses to go past ``limit`` bytes."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.left = fd, limit

    def read(self, size: int = -1) -> bytes:
        size = 1 << 16 if size is None or size < 0 else min(size, 1 << 20)
        chunk = os.read(self.fd, size)
        self.left -= len(chunk)
        if self.left < 0:
            raise EvaluationError(f"the test report grew past {human_size(MAX_REPORT)} while it was read")
        return chunk


def open_file(dir_fd: int, name: str, what: str) -> int | None:
    """A regular file in a run's directory, never through a link (None: it is not there)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise EvaluationError(f"the {what} cannot be read ({why}): refused") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise EvaluationError(f"the {what} is not a regular file: refused")
    if st.st_size > MAX_REPORT:
        os.close(fd)
        raise EvaluationError(f"the {what} is {human_size(st.st_size)}, more than the {human_size(MAX_REPORT)} "
                              "the executor reads: refused")
    return fd


def read_report(dir_fd: int, name: str) -> Report | None:
    """The report ``name`` in the run directory open at ``dir_fd``; None when the run wrote none."""
    fd = open_file(dir_fd, name, "JUnit XML report")
    if fd is None:
        return None
    try:
        return parse(_Capped(fd, MAX_REPORT))
    finally:
        os.close(fd)


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def case_id(classname: str | None, name: str | None) -> str:
    classname, name = (classname or "").strip(), (name or "").strip()
    ident = f"{classname}::{name}" if classname and name else classname or name
    return ident[:MAX_ID]


def parse(stream: BinaryIO | _Capped) -> Report:
    """Outcomes of every ``testcase`` of a JUnit XML stream; ``EvaluationError`` for anything else."""
    report = Report()
    stack: list = []
    try:
        for event, elem in SafeET.iterparse(stream, events=("start", "end"), forbid_dtd=True):
            if event == "start":
                stack.append(elem)
                if len(stack) > MAX_DEPTH:
                    raise EvaluationError(f"the test report nests elements deeper than {MAX_DEPTH}: refused")
                continue
            stack.pop()
            tag = _local(elem.tag)
            if tag == "testcase":
                _case(report, elem)
                if len(report.outcomes) > MAX_TESTS:
                    raise EvaluationError(f"the test report names more than {MAX_TESTS} tests: refused")
            if stack and _local(stack[-1].tag) != "testcase":
                stack[-1].remove(elem)  # done with it: a long report never lives in memory whole
    except (ParseError, defusedxml.DefusedXmlException, ValueError) as exc:
        raise EvaluationError(f"the test report is not JUnit XML the executor accepts: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return report  # an empty <testsuites/> reports no test; an empty file or a cut one does not parse


def _case(report: Report, elem) -> None:
    outcome = "passed"
    for child in elem:
        found = _CHILD_OUTCOME.get(_local(child.tag))
        if found is not None and OUTCOMES.index(found) > OUTCOMES.index(outcome):
            outcome = found
    ident = case_id(elem.get("classname"), elem.get("name"))
    if ident:
        report.add(ident, outcome, (elem.get("file") or "")[:MAX_ID] or None)
    elem.clear()
