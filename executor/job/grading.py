"""One job's graded test gate (policy ``evaluation = "tests"``): run it, record it, say what follows.

Owns turning the gate's runs and verdict into the job's record: a ``test_run`` event per run, the *after*
run as the job's tests (``test_exit_code``, ``test_output`` and the ``tests`` event, as the exit-code gate
records them), ``Job.evaluation`` (kind, verdict, fail-to-pass, broken, flaky and the job's own tests, the
coverage gained, the runs) and an ``evaluation`` event. Then what follows: nothing (the change goes on to
review or commit), a review reason (weak tests when ``on_weak_tests = "review"``), or the broken rule's
error.

Must never: commit or roll back (the pipeline does), or let a verdict that broke a rule through without a
person.
"""

from __future__ import annotations

from ..errors import ExecutorError, WeakTests
from ..evaluation.cache import BeforeCache
from ..evaluation.gate import Gate, evaluate
from ..policy import Policy
from ..sandbox.runtime import TestRun
from ..store import Job
from ..transaction.workspace import Workspace
from .context import Context
from .judge import judge_run_end
from .record import record_tests
from .stop import StopCheck

#: The parts of the record the ``evaluation`` event repeats (the job row holds the whole record).
EVENT_KEYS = ("kind", "verdict", "proved", "fail_to_pass", "broken", "flaky", "failing", "weak", "coverage",
              "before_cache")


def graded_gate(ctx: Context, job: Job, ws: Workspace, policy: Policy, stop: StopCheck) -> list[dict]:
    """Run the graded gate on the job's change. Raises the error of the rule it broke; returns the review
    reasons it adds (weak tests a person is to judge), empty when the change may go on."""
    runs: list[dict] = []

    def on_run(name: str, tests: TestRun | None, reported: int | None, problem: str | None) -> None:
        row = {"run": name, "cached": tests is None, "tests_reported": reported, "problem": problem}
        if tests is not None:
            row.update(exit_code=tests.exit_code, duration=round(tests.duration, 3), timed_out=tests.timed_out,
                       oom_killed=tests.oom_killed)
        runs.append(row)
        ctx.store.add_event(job, ws.attempt, "test_run", {
            **row, "output_tail": tests.output_tail[-1000:] if tests is not None else None})

    cache = BeforeCache(ctx.settings.evaluation_dir / "before", ctx.sandbox.image_id())
    gate = Gate(ctx.sandbox, ws, job.test_command or "true", policy, stop, judge=lambda t: judge_run_end(t, policy),
                on_run=on_run, cache=cache)
    try:
        verdict = evaluate(gate)
    except ExecutorError as exc:
        _record(ctx, job, ws, gate, {"kind": None, "verdict": exc.reason, "message": str(exc), "runs": runs,
                                     "before_cache": gate.cache_note})
        raise
    record = {**verdict.record(), "runs": runs, "before_cache": gate.cache_note}
    _record(ctx, job, ws, gate, record)
    error = verdict.error
    if error is None:
        return []
    if isinstance(error, WeakTests) and policy.on_weak_tests == "review":
        return [{"trigger": "weak_tests", "message": f"weak tests ({error.reason}): {error}",
                 "tests": list(error.context.get("tests") or [])}]
    raise error


def _record(ctx: Context, job: Job, ws: Workspace, gate: Gate, record: dict) -> None:
    if gate.first_after is not None:
        record_tests(ctx, job, ws.attempt, gate.first_after)
    ctx.store.update_job(job.id, evaluation=record)
    ctx.store.add_event(job, ws.attempt, "evaluation", {k: record.get(k) for k in (*EVENT_KEYS, "message")})
