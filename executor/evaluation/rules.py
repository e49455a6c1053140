"""The graded gate's rules: from the reports of the *before*, *tests only* and *after* runs to a verdict.

Owns which tests are the job's (new ids, and tests of the test files it changed), what flaky means (a test
whose outcome flips between the *after* run and its re-runs: it counts for nothing), and the rules, each
with its own ending:

  * no regression: every test that passed *before* passes *after*; failing, erroring, skipped or gone
    (deleted) is a ``Regression``;
  * the job's own tests pass *after* (``TestsFailed`` otherwise);
  * proof, for a job that changed tests and code: at least one of its tests fails (or errors, or cannot
    even be collected) on *tests only* and passes *after* (``WeakTests`` otherwise);
  * hardening, for a job that changed only tests: the suite covers a line or branch of code files that it
    did not cover *before* (``NoCoverageGain`` otherwise; no coverage data is an ``EvaluationError``).

Must never: run anything, touch a file, or count a flaky test for or against a job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import EvaluationError, ExecutorError, NoCoverageGain, Regression, TestsFailed, WeakTests
from ..transaction.upper import listed
from .coverage import Coverage, gain, total_lines
from .junit import FAILING, Report
from .layers import Split

#: Tests listed per category in the job record.
LIST_LIMIT = 200


@dataclass
class Runs:
    """The reports of one evaluation. ``before`` None: the repository's suite wrote no report on the old
    code (then nothing passed before). ``tests_only`` None: not run, or (``tests_only_ran``) it wrote no
    report, so none of the job's tests could pass without the change."""

    after: list[Report]
    before: Report | None = None
    tests_only: Report | None = None
    tests_only_ran: bool = False
    coverage_before: Coverage | None = None
    coverage_after: Coverage | None = None


@dataclass
class Verdict:
    kind: str
    fail_to_pass: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    flaky: list[str] = field(default_factory=list)
    job_tests: list[str] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)
    weak: list[str] = field(default_factory=list)
    pass_to_pass: int = 0
    passed: int = 0  # tests that pass with the change (the first after run, flaky ones left out)
    proved: bool | None = None  # None: the job wrote no tests to prove anything with
    coverage: dict | None = None
    error: ExecutorError | None = None

    def record(self) -> dict:
        return {"kind": self.kind, "verdict": self.error.reason if self.error else "passed", "proved": self.proved,
                "fail_to_pass": self.fail_to_pass[:LIST_LIMIT], "broken": self.broken[:LIST_LIMIT],
                "flaky": self.flaky[:LIST_LIMIT], "job_tests": self.job_tests[:LIST_LIMIT],
                "failing": self.failing[:LIST_LIMIT], "weak": self.weak[:LIST_LIMIT],
                "pass_to_pass": self.pass_to_pass, "passed": self.passed, "coverage": self.coverage,
                "message": str(self.error) if self.error else None}


def module_of(path: str) -> str | None:
    """The dotted module a Python test file is collected as (``tests/test_calc.py`` -> ``tests.test_calc``)."""
    if not path.endswith(".py"):
        return None
    return path[:-3].replace("/", ".")


def in_files(test: str, report_file: str | None, paths: set[str], modules: set[str]) -> bool:
    """Whether ``test`` belongs to one of the changed test files: by the report's ``file`` attribute, or by
    its dotted class name (pytest's ``classname``, or a collection error's ``name``)."""
    if report_file:
        rel = report_file.removeprefix("/workspace/").removeprefix("./")
        if rel in paths:
            return True
    head = test.split("::", 1)[0]
    return any(head == m or head.startswith(m + ".") for m in modules)


def flaky_tests(after: list[Report]) -> set[str]:
    """Tests that both passed and failed across the *after* run and its re-runs."""
    seen: dict[str, set[str]] = {}
    for report in after:
        for test, outcome in report.outcomes.items():
            seen.setdefault(test, set()).add("fail" if outcome in FAILING else outcome)
    return {t for t, outs in seen.items() if "passed" in outs and "fail" in outs}


def job_tests(split: Split, before: Report | None, after: Report) -> set[str]:
    """The tests the job added (ids the old suite did not have) or changed (in the test files it changed)."""
    if not split.tests:
        return set()
    paths = set(split.test_files)
    modules = {m for m in map(module_of, paths) if m}
    known = before.outcomes if before is not None else {}
    return {t for t in after.outcomes
            if t not in known or in_files(t, after.files.get(t), paths, modules)}


def grade(split: Split, runs: Runs, test_paths: tuple[str, ...] | list[str]) -> Verdict:
    """Apply the rules; the verdict's ``error`` is the first rule broken (None: the change may go on)."""
    after = runs.after[0]
    verdict = Verdict(split.kind)
    flaky = flaky_tests(runs.after)
    verdict.flaky = sorted(flaky)
    passed_before = runs.before.with_outcome("passed") if runs.before is not None else set()
    verdict.broken = sorted(t for t in passed_before - flaky if after.outcomes.get(t) != "passed")
    verdict.pass_to_pass = len(passed_before - flaky) - len(verdict.broken)
    verdict.passed = len(after.with_outcome("passed") - flaky)
    mine = job_tests(split, runs.before, after) - flaky
    verdict.job_tests = sorted(mine)
    verdict.failing = sorted(t for t in mine if after.outcomes.get(t) in FAILING)
    errors: list[ExecutorError] = []
    if verdict.broken:
        errors.append(Regression(
            f"{len(verdict.broken)} test(s) that passed before the change do not pass after it (a deleted or "
            f"skipped test counts as failed): {listed(verdict.broken)}", tests=verdict.broken))
    if verdict.failing:
        errors.append(TestsFailed(f"the job's own tests fail with its change: {listed(verdict.failing)}",
                                  tests=verdict.failing))
    if split.kind == "tests_and_code" and mine:
        errors.extend(_proof(verdict, runs, mine, passed_before))
    elif split.kind == "tests":
        errors.extend(_hardening(verdict, runs, test_paths))
    verdict.error = errors[0] if errors else None
    return verdict


def _proof(verdict: Verdict, runs: Runs, mine: set[str], passed_before: set[str]) -> list[ExecutorError]:
    after = runs.after[0]
    without = runs.tests_only.outcomes if runs.tests_only is not None else {}

    def failed_without(test: str) -> bool:
        outcome = without.get(test)
        return outcome is None or outcome in FAILING  # absent: not even collected on the old code

    verdict.fail_to_pass = sorted(t for t in mine if failed_without(t) and after.outcomes.get(t) == "passed")
    verdict.proved = bool(verdict.fail_to_pass)
    if verdict.proved:
        return []
    passing = sorted(t for t in mine if without.get(t) == "passed")
    new_ones = [t for t in passing if t not in passed_before]
    verdict.weak = new_ones or passing
    why = (f"they already pass without it: {listed(verdict.weak)}" if verdict.weak
           else f"none of them passes with it: {listed(sorted(mine))}")
    return [WeakTests(f"the job's tests prove nothing: none of them fails without the job's code change and "
                      f"passes with it; {why}", tests=verdict.weak or sorted(mine))]


def _hardening(verdict: Verdict, runs: Runs, test_paths: tuple[str, ...] | list[str]) -> list[ExecutorError]:
    if runs.coverage_before is None or runs.coverage_after is None:
        which = "before" if runs.coverage_before is None else "after"
        return [EvaluationError(f"the job changed only tests, and the rule for such jobs needs coverage.py's line "
                                f"data, which the {which} run did not produce (the test command must run the "
                                f"suite with the sandbox's python3)")]
    gained = gain(runs.coverage_before, runs.coverage_after, test_paths)
    verdict.coverage = {**gained.to_json(), "before": total_lines(runs.coverage_before, test_paths),
                        "after": total_lines(runs.coverage_after, test_paths)}
    verdict.proved = gained.any
    if gained.any:
        return []
    verdict.weak = verdict.job_tests
    return [NoCoverageGain(f"the job changed only tests, and they cover no line or branch of the code that the "
                           f"suite did not cover before ({verdict.coverage['before']} lines): they harden nothing",
                           tests=verdict.job_tests)]
