"""Judging a finished agent run and a finished test run: did they earn the next step, and if not, why not.

Owns the rules that turn what a run did (how it stopped, its exit, the models that answered, its outcome)
into either nothing (go on) or one error of the tree (``errors.py``) whose reason, status and message the
job ends with.

Must never: touch the store, the engine or the workspace; it only decides.
"""

from __future__ import annotations

import time

from ..errors import (
    AgentFailed,
    Cancelled,
    DiskLimit,
    DiskReserve,
    Interrupted,
    ModelMismatch,
    OutOfMemory,
    Stalled,
    TestsFailed,
    TestsOutOfMemory,
    TestsTimedOut,
    TimedOut,
)
from ..agent.registry import agent_for
from ..policy import Policy, Runner
from ..sandbox.runtime import AgentRun, TestRun
from ..settings import format_size, human_size


def judge_agent(runner: Runner, policy: Policy, run: AgentRun, refused: list[str] | None = None,
                gateway_gap: bool = False, answered: list[str] | None = None) -> None:
    """Raise why the agent's run does not earn a test run; return when it does. ``refused``: models the job's
    API gateway refused (a sealed job never reaches another model; asking for one fails it); ``answered``:
    other models whose answers the gateway saw (for agents whose stream never names the model). ``gateway_gap``:
    the job's gateway was not served for a while (a sealed attempt adopted after the executor restarted):
    an API error with no HTTP status then means the agent could not reach it, the executor's doing."""
    _stopped(run.stopped, "the attempt")
    if refused:
        raise ModelMismatch(runner.name, runner.model, refused, refused_at_gateway=True)
    if answered:
        raise ModelMismatch(runner.name, runner.model, answered)
    if run.stopped == "stalled":
        raise _stalled(policy, run)
    if run.stopped in ("disk_limit", "disk_reserve"):
        raise _disk(run.stopped, policy, run.disk_used, "the agent", run.disk_full)
    if run.stopped == "timeout":
        raise TimedOut(f"the agent ran longer than the policy's timeout ({policy.timeout:g}s); its changes "
                       "were rolled back")
    if run.oom_killed:
        raise OutOfMemory(f"the agent container hit its memory limit ({format_size(policy.memory)}) and was "
                          "killed; raise the policy's memory")
    # a name the CLI gives its own messages (Claude Code's ``<synthetic>``) is not a model that answered
    wrong = [m for m in run.state.models_seen if m != runner.model and m not in agent_for(runner).own_voices]
    if wrong:
        raise ModelMismatch(runner.name, runner.model, wrong)
    outcome = run.outcome
    if outcome.kind == "success":
        return
    if gateway_gap and outcome.kind == "api_error" and not _answered(run):
        raise Interrupted(f"the agent could not reach its API gateway while the executor restarted "
                          f"({outcome.message}); the attempt was rolled back and the job re-queued")
    if outcome.kind == "agent_error":
        limit = (f" (the container's pids limit of {policy.pids} refused {run.refused_forks} forks: a fork "
                 "bomb or runaway processes; raise the policy's pids if the work needs more)") if run.refused_forks else ""
        raise AgentFailed(f"the agent did not succeed: {outcome.message}{limit}")
    error = outcome.to_error(runner=runner.name)
    if not error.retryable:
        label = outcome.kind.replace("_", " ")
        error.message = f"{runner.name} failed: {label}: {outcome.message}"
    raise error


def _answered(run: AgentRun) -> bool:
    """Whether any failed API call got an HTTP answer (from the gateway or through it)."""
    return bool(run.state.error_statuses)


def _stopped(stopped: str | None, during: str) -> None:
    """The executor itself ended the run: it is stopping, or a person cancelled the job."""
    if stopped == "shutdown":
        raise Interrupted(f"the executor stopped during {during}")
    if stopped == "taken_over":
        raise Interrupted(f"this host was found lost during {during} and another host took the job over")
    if stopped == "cancelled":
        raise Cancelled(f"cancelled while {'the agent' if during == 'the attempt' else 'the tests'} ran")


def _stalled(policy: Policy, run: AgentRun) -> Stalled:
    alive = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.last_alive or time.time()))
    message = (f"no progress for {policy.stall_after:g}s (stall_after): last alive at {alive}, last activity: "
               f"{run.last_activity or 'none'}; the container was killed and its changes discarded"
               + ("; re-queued from the clean repository (retry_stalled)" if policy.retry_stalled else ""))
    error = Stalled(message)
    if policy.retry_stalled:
        error.ends_as = "queued"
    return error


def _disk(why: str, policy: Policy, used: int | None, who: str, full: str = "") -> DiskLimit:
    wrote = human_size(used) if used else "more"
    if why == "disk_reserve":
        return DiskReserve(f"free space under the state root fell below EXECUTOR_DISK_RESERVE while {who} ran; this "
                           f"job had written the most ({wrote}) and was stopped; its changes were discarded")
    limit = format_size(policy.disk)
    if full == "inodes":
        held = (f"used up the inodes of the job's disk, the policy's disk limit of {limit} (one per 8 KiB: too "
                f"many files; {wrote} in use)")
    elif full:
        held = (f"filled the job's disk, the policy's disk limit of {limit} ({wrote} in use by its upper dir, home "
                "layer and test layers, files deleted but held open included)")
    else:
        held = f"wrote {wrote} (its upper dir, home layer and test layers) over the policy's disk limit of {limit}"
    return DiskLimit(f"{who} {held}; it was stopped and its changes discarded; raise the policy's disk if the "
                     "work needs more")


def judge_tests(tests: TestRun, policy: Policy | None = None) -> None:
    """Raise why the test run does not let the change through; return when it passed."""
    judge_run_end(tests, policy)
    if not tests.passed:
        raise TestsFailed(f"the tests failed (exit {tests.exit_code}): {tests.command}")


def judge_run_end(tests: TestRun, policy: Policy | None = None) -> None:
    """Raise when a test run did not end by itself (stopped, timed out, out of memory, over the disk cap);
    its exit code is not judged (the graded gate reads the report instead)."""
    _stopped(tests.stopped, "the tests")
    if tests.stopped in ("disk_limit", "disk_reserve"):
        raise _disk(tests.stopped, policy or Policy(), tests.disk_used, "the tests", tests.disk_full)
    if tests.timed_out:
        raise TestsTimedOut("the tests ran longer than the policy's test_timeout")
    if tests.oom_killed:
        raise TestsOutOfMemory("the tests hit the memory limit")
