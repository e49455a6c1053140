"""Running the graded gate: the *after*, *before* and *tests only* runs on overlay views, and their grade.

Owns the order and the bounds of the runs. *After* (the job's change over the repository, today's test
view) runs first: without a readable report there is nothing to grade (``EvaluationError``). A run whose
tests fail is run again, on the same throwaway layer, up to ``flaky_reruns`` times, until every failing
test has flipped. *Before* (the repository alone) comes from the cache when the repository's tree has a
state (``cache.tree_state``: what the run sees, git or not) and a run on it is kept, else it runs (and is
kept when the tree was the same before and after it). Coverage is measured (about three times the run's
cost) only for a test-only job, in *after* and *before*; a cached *before* without coverage is run again, measured, for such a job. *Tests
only* (the job's test-file changes over the repository) runs when the job changed tests and code. Every run
gets its own directory for its report, at most ``test_timeout``, and all of them together at most
``evaluation_timeout``. Each view is discarded when its runs are done.

Must never: grade a change without a readable *after* report, let a run's failure pass for success, cache a
run that wrote no readable report, or leave a view or a run directory behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import EvaluationError, EvaluationTimedOut, ExecutorError
from ..policy import Policy
from ..sandbox.deployment import Deployment
from ..sandbox.disk import meter_for
from ..sandbox.runtime import RUN_DIR_MOUNT, StopCheck, TestRun, run_tests
from ..transaction import workspace
from ..transaction.safefs import DIR_FLAGS
from ..transaction.upper import Change, scan_upper
from ..transaction.workspace import Workspace
from . import coverage as cov
from .cache import BeforeCache, tree_state
from .junit import FAILING, Report, read_report
from .layers import Split, build_tests_layer, split
from .rules import Runs, Verdict, grade

REPORT_NAME = "junit.xml"
#: The variable a test command writes its JUnit XML report to (pytest: --junitxml="$EXECUTOR_JUNIT_XML").
REPORT_VAR = "EXECUTOR_JUNIT_XML"

#: Told about each run: its name (after, after-rerun-1, before, tests-only), the run (None: from the cache),
#: how many tests its report named (None: no report) and what made the run unusable (None: nothing did).
RunSink = Callable[[str, TestRun | None, int | None, str | None], None]
#: Judges a finished run's end (timeout, cancel, out of memory, disk) like the exit-code gate; raises.
RunJudge = Callable[[TestRun], None]


@dataclass
class Gate:
    sandbox: Deployment
    ws: Workspace
    command: str
    policy: Policy
    should_stop: StopCheck
    judge: RunJudge
    on_run: RunSink
    cache: BeforeCache | None = None
    deadline: float = field(default=0.0)
    first_after: TestRun | None = None
    cache_note: str = "off"  # what became of the before cache: hit, stored, or why the repository has no state

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise EvaluationTimedOut(f"the graded gate's runs together took longer than the policy's "
                                     f"evaluation_timeout ({self.policy.evaluation_timeout:g}s)")
        return left

    def run(self, name: str, view: str, measure: bool) -> tuple[TestRun, Report | None, cov.Coverage | None]:
        """One run of the test command on ``view``: its end judged, its report and coverage read."""
        run_dir = workspace.fresh_run_dir(self.ws, name)
        env = {REPORT_VAR: f"{RUN_DIR_MOUNT}/{REPORT_NAME}"}
        dir_fd = os.open(run_dir, DIR_FLAGS)
        try:
            if measure:
                env.update(cov.prepare(dir_fd, self.ws.uid, self.ws.gid))
            left = self.left()
            disk = meter_for(self.ws.layers, self.policy.disk)  # the change, the view and the run dir
            tests = run_tests(self.sandbox, self.ws, self.command, self.policy, should_stop=self.should_stop,
                              disk=disk, view=view, run_dir=run_dir, environment=env, timeout=left,
                              argv=cov.wrapped(self.command) if measure else None)
            try:
                if tests.timed_out and left < self.policy.test_timeout:
                    raise EvaluationTimedOut(f"the graded gate's runs together took longer than the policy's "
                                             f"evaluation_timeout ({self.policy.evaluation_timeout:g}s) in the "
                                             f"{name} run")
                self.judge(tests)
                report = read_report(dir_fd, REPORT_NAME)
                coverage = cov.read(dir_fd) if measure else None
            except ExecutorError as exc:
                self.on_run(name, tests, None, str(exc))
                if type(exc) is EvaluationError:
                    raise EvaluationError(f"{exc} (the {name} run)") from None
                raise
        finally:
            os.close(dir_fd)
        self.on_run(name, tests, len(report.outcomes) if report is not None else None, None)
        return tests, report, coverage


def evaluate(gate: Gate) -> Verdict:
    """Every run the change needs, then the grade (whose ``error`` says which rule, if any, it broke)."""
    gate.deadline = time.monotonic() + gate.policy.evaluation_timeout
    change = scan_upper(gate.ws.upper)
    parts = split(change, gate.policy.test_paths)
    if parts.kind == "none":
        return Verdict("none")
    try:
        after, coverage_after = _after(gate, measure=parts.kind == "tests")
        runs = Runs(after=after, coverage_after=coverage_after)
        runs.before, runs.coverage_before = _before(gate, measure=parts.kind == "tests")
        if parts.kind == "tests_and_code":
            runs.tests_only_ran = True
            runs.tests_only = _tests_only(gate, change, parts)
    finally:
        workspace.discard_test_view(gate.sandbox, gate.ws)
    return grade(parts, runs, gate.policy.test_paths)


def _after(gate: Gate, measure: bool) -> tuple[list[Report], cov.Coverage | None]:
    workspace.create_test_view(gate.sandbox, gate.ws, "test")
    try:
        tests, first, coverage = gate.run("after", "test", measure)
        gate.first_after = tests
        if first is None:
            raise EvaluationError(
                f"the test command wrote no JUnit XML report to ${REPORT_VAR} (exit {tests.exit_code}): the "
                f"graded gate needs one per run, e.g. python3 -m pytest --junitxml=\"${REPORT_VAR}\"")
        reports = [first]
        for number in range(1, gate.policy.flaky_reruns + 1):
            if not _unflipped(reports):
                break
            _, again, _ = gate.run(f"after-rerun-{number}", "test", False)
            if again is not None:
                reports.append(again)
        return reports, coverage
    finally:
        workspace.discard_view(gate.sandbox, gate.ws, "test")


def _unflipped(reports: list[Report]) -> set[str]:
    """Tests that failed in some run and have passed in none."""
    failed = set().union(*(r.with_outcome(*FAILING) for r in reports))
    passed = set().union(*(r.with_outcome("passed") for r in reports))
    return failed - passed


def _before(gate: Gate, measure: bool) -> tuple[Report | None, cov.Coverage | None]:
    """The repository's own suite: from the cache, or run (and cached when the repository has a state).
    ``measure``: coverage is needed (a test-only job); a cached result without it is run again, measured."""
    key = None
    if gate.cache is not None:
        state = _state(gate)
        key = gate.cache.key(state, gate.command) if state else None
        found = gate.cache.load(key) if key else None
        if found is not None and (found[1] is not None or not measure):
            gate.cache_note = "hit"
            gate.on_run("before", None, len(found[0].outcomes), None)
            return found
    workspace.create_test_view(gate.sandbox, gate.ws, "before", [gate.ws.repo])
    try:
        _, report, coverage = gate.run("before", "before", measure)
    finally:
        workspace.discard_view(gate.sandbox, gate.ws, "before")
    if report is not None and key is not None:
        if _state(gate) == state:  # the tree the run saw is the one keyed: nothing changed while it ran
            gate.cache.store(key, report, coverage)
            gate.cache_note = "stored"
        else:
            gate.cache_note = "the repository changed while before ran"
    return report, coverage


def _state(gate: Gate) -> str | None:
    """The repository's state now (``cache.tree_state``); why it has none goes to ``cache_note``."""
    repo_fd = gate.ws.open_repo()
    try:
        state, gate.cache_note = tree_state(repo_fd)
    finally:
        os.close(repo_fd)
    return state


def _tests_only(gate: Gate, change: Change, parts: Split) -> Report | None:
    ws = gate.ws
    repo_fd = ws.open_repo()
    try:
        top_mode = os.fstat(repo_fd).st_mode & 0o777
    finally:
        os.close(repo_fd)
    build_tests_layer(change, parts.tests, ws.upper, ws.tests_layer, ws.uid, ws.gid, top_mode)
    workspace.create_test_view(gate.sandbox, ws, "tests", [ws.tests_layer, ws.repo])
    try:
        _, report, _ = gate.run("tests-only", "tests", False)
    finally:
        workspace.discard_view(gate.sandbox, ws, "tests")
    return report
