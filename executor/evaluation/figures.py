"""The evaluation gate's figures over many jobs: what ``executor report`` says of it.

Owns their definitions, over the jobs' records (``Job.evaluation``, ``Job.reason``): graded = jobs the gate
graded (it had a change to grade); test-writing = those that changed tests (with code, or only tests:
hardening), and their share of the graded; proof rate = the test-writing jobs whose tests proved their
change (fail-to-pass, or coverage gained) / test-writing; weak-test rejections = verdicts ``weak_tests`` or
``no_coverage_gain`` (rolled back or sent to review); regressions caught = verdicts ``regression``;
evaluation errors = jobs that ended ``evaluation_error`` or ``evaluation_timeout``; flaky tests = tests
reported flaky, summed.

Must never: read the store or anything else; it counts the records it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WEAK_VERDICTS = frozenset({"weak_tests", "no_coverage_gain"})


def evaluation_stats(jobs: Iterable[Any]) -> dict[str, Any]:
    """The figures over ``jobs`` (anything with a job's ``evaluation`` and ``reason``)."""
    jobs = list(jobs)
    graded = [j.evaluation for j in jobs if j.evaluation and j.evaluation.get("kind") not in (None, "none")]
    writing = [e for e in graded if e["kind"] in ("tests", "tests_and_code")]
    proved = sum(1 for e in writing if e.get("proved"))
    return {
        "graded": len(graded),
        "test_writing": len(writing),
        "test_writing_share": round(len(writing) / len(graded), 4) if graded else None,
        "hardening": sum(1 for e in writing if e["kind"] == "tests"),
        "proved": proved,
        "proof_rate": round(proved / len(writing), 4) if writing else None,
        "weak_test_rejections": sum(1 for e in graded if e.get("verdict") in WEAK_VERDICTS),
        "regressions_caught": sum(1 for e in graded if e.get("verdict") == "regression"),
        "evaluation_errors": sum(1 for j in jobs if j.reason in ("evaluation_error", "evaluation_timeout")),
        "flaky_tests": sum(len(e.get("flaky") or []) for e in graded),
    }
