"""One job's life: workspace, agent, test gate, then commit or rollback.

Owns the order of a job's steps and the status each outcome leads to:

    queued -> running -> testing -> committing -> succeeded
                 |-> waiting_retry (rate limited: slot freed, upper kept) -> running (same runner, resumed)
                 |           |-> rolled_back (tests failed)      committing -> failed (cannot apply)
                 |           |-> failed (conflict, unsafe change, timeout ...) / cancelled
                 |-> rolled_back (agent error) / failed (timeout, oom, API errors, model mismatch)
                 |-> cancelled / queued again (the executor is stopping: the attempt is rolled back)

Only an agent that reported success *and* a passing test run lead to a commit; anything else removes
the job's overlay and leaves the repository as it was. A commit in progress is journaled by the status
``committing`` and the kept upper dir: after a crash it is redone (the apply is idempotent).

Must never: commit without a passing test run, run a job it did not move to ``running`` itself, or
hide why a job ended.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from . import compaction, retry, review, workspace
from .commit import Change, apply_change, check_conflicts, scan_upper
from .errors import ConfigError, Conflict, ExecutorError, IllegalTransition, ModelMismatch, UnsafePath
from .policy import Policy, Runner
from .redact import Redactor, scrub_tree
from .liveness import Beat, Watchdog
from .notify import Notifier
from .runner import AgentRun, TestRun, agent_environment, agent_spec, run_tests, watch_agent
from .sandbox import Sandbox
from .settings import Settings, format_size
from .store import Heartbeat, Job, RateLimitEvent, Status, Store, utcnow
from .stream import SYNTHETIC_MODEL, Event
from .workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every job needs from the executor, passed down explicitly."""

    settings: Settings
    store: Store
    sandbox: Sandbox
    runners: dict[str, Runner]
    secrets: Mapping[str, str]
    shutdown: threading.Event = field(default_factory=threading.Event)
    #: the watchdog of each job whose agent runs now (status reads their last samples)
    watchdogs: dict[str, Watchdog] = field(default_factory=dict)
    pids_reported: dict[str, int] = field(default_factory=dict)  # refused forks already in the log
    redactor: Redactor | None = None
    notifier: Notifier | None = None  # a POST when a job enters review or fails (EXECUTOR_NOTIFY_URL)


@dataclass
class Ending:
    """Where an attempt ended: the status to move to and why."""

    status: Status
    reason: str
    error: str | None = None
    keep_upper: bool = False
    fields: dict = field(default_factory=dict)  # more job fields to set with the status


#: What the agent is told when its conversation is resumed after a rate limit.
RESUME_PROMPT = ("Your previous attempt at this task was interrupted by an API rate limit. The workspace is as "
                 "you left it. Continue where you stopped and finish the task:\n\n{prompt}")


def log_state(job: Job, status: Status | str, attempt: int, **fields: object) -> None:
    value = status.value if isinstance(status, Status) else status
    log.info("job %s", value, extra={"action": "state", "job": job.id, "session": job.session_id,
                                      "runner": job.runner, "attempt": attempt, "status": value, **fields})


def workspace_for(settings: Settings, job: Job, attempt: int) -> Workspace:
    return Workspace(job_id=job.id, attempt=attempt, repo=Path(job.workspace),
                     root=settings.job_dir(job.id), uid=job.repo_uid or 1000, gid=job.repo_gid or 1000)


class _StopCheck:
    """Why the running attempt must stop: executor shutdown, or a cancel asked through the store."""

    def __init__(self, ctx: Context, job_id: str) -> None:
        self.ctx, self.job_id = ctx, job_id
        self._next_poll = 0.0
        self._cancelled = False

    def __call__(self) -> str | None:
        if self.ctx.shutdown.is_set():
            return "shutdown"
        now = time.monotonic()
        if not self._cancelled and now >= self._next_poll:
            self._next_poll = now + 1.0  # a cancel is a person's action: a second is quick enough
            job = self.ctx.store.get(self.job_id)
            self._cancelled = bool(job and job.cancel_requested)
        return "cancelled" if self._cancelled else None


def run_job(ctx: Context, job_id: str) -> Job:
    """Run one attempt of a queued job to a settled status (or back to queued on shutdown)."""
    job = ctx.store.get(job_id)
    assert job is not None
    number = job.attempts + 1
    resume = job.resume_session if job.status == Status.waiting_retry else None
    # A resumed attempt continues the earlier attempt's changes: the repository is judged against
    # the moment those started.
    start_ns = job.start_ns if resume and job.start_ns else time.time_ns()
    job = ctx.store.transition(job.id, (Status.queued, Status.waiting_retry), Status.running,
                               started_at=job.started_at or utcnow(), start_ns=start_ns, attempts=number,
                               retry_at=None, resume_session=None)
    ctx.store.start_attempt(job.id, number)
    ctx.store.add_event(job, number, "state", {"status": "running", "attempt": number, "resume": resume})
    log_state(job, Status.running, number)
    ws = workspace_for(ctx.settings, job, number)
    try:
        ending = _attempt(ctx, job, ws, resume)
    except ExecutorError as exc:
        ending = Ending(Status.failed, exc.reason, str(exc))
    return settle(ctx, job, ws, ending)


def _attempt(ctx: Context, job: Job, ws: Workspace, resume: str | None) -> Ending:
    runner = _runner_of(ctx, job)
    policy = Policy(**job.policy)
    home = workspace.session_home(ctx.settings.sessions_dir, job.session_id, ws.uid, ws.gid)
    if resume and not (transcript_readable(home, resume) and ws.upper.is_dir()):
        ctx.store.add_event(job, ws.attempt, "resume_unavailable", {
            "claude_session_id": resume,
            "why": "the session transcript or the kept workspace cannot be read: starting fresh from the "
                   "clean repository"})
        resume = None
    workspace.create(ctx.sandbox, ws, keep_upper=resume is not None)
    # A follow-up job of a session starts from the session brief (or continues the previous conversation).
    start = compaction.start(ctx.store, ctx.settings, ctx.secrets, job, policy, ws.attempt,
                             transcript_ok=lambda sid: transcript_readable(home, sid), resuming=resume is not None)
    prompt = RESUME_PROMPT.format(prompt=job.prompt) if resume else job.prompt
    if start.prompt_note:
        prompt = f"{start.prompt_note}\n\n{prompt}"
    environment = agent_environment(runner, ctx.secrets, max_retries=policy.cli_max_retries)
    system = "\n\n".join(system_prompt_parts(ctx, job, policy, brief=start.brief)) or None
    spec = agent_spec(ws, runner, policy, prompt, environment, home=str(home), resume=resume or start.resume,
                      append_system_prompt=system)
    container = ctx.sandbox.start(spec)
    return _supervise(ctx, job, ws, runner, policy, container)


def system_prompt_parts(ctx: Context, job: Job, policy: Policy, brief: str | None = None) -> list[str]:
    """What the executor appends to the agent's system prompt (``--append-system-prompt``), in order."""
    parts: list[str] = []
    if policy.review != "never":
        parts.append(review.REVIEW_INSTRUCTION)  # the model may send its change to a person (review.py)
    if brief:
        parts.append(brief)  # the session brief (compaction.py): last, it is the longest part
    return parts


def transcript_readable(home: Path, claude_session_id: str) -> bool:
    """Whether Claude Code's transcript of a session is there and parses (else a retry starts fresh)."""
    for path in (home / ".claude" / "projects").glob(f"*/{claude_session_id}.jsonl"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return bool(lines) and all(json.loads(line) is not None for line in lines if line.strip())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    return False


def adopt_job(ctx: Context, job_id: str, container) -> Job:
    """Supervise again an agent container that outlived an executor restart."""
    job = ctx.store.get(job_id)
    assert job is not None
    ws = workspace_for(ctx.settings, job, job.attempts)
    ctx.store.add_event(job, ws.attempt, "adopted", {"container": container.name})
    log_state(job, "adopted", ws.attempt)
    try:
        runner = _runner_of(ctx, job)
        ending = _supervise(ctx, job, ws, runner, Policy(**job.policy), container,
                            skip_lines=ctx.store.last_stream_line(job.id, ws.attempt))
    except ExecutorError as exc:
        ending = Ending(Status.failed, exc.reason, str(exc))
    return settle(ctx, job, ws, ending)


def retest_job(ctx: Context, job_id: str) -> Job:
    """Run the test gate again for a job whose tests were interrupted by an executor restart."""
    job = ctx.store.get(job_id)
    assert job is not None
    ws = workspace_for(ctx.settings, job, job.attempts)
    ctx.store.add_event(job, ws.attempt, "adopted", {"phase": "testing"})
    try:
        ending = _test_and_commit(ctx, job, ws, Policy(**job.policy), _StopCheck(ctx, job.id))
    except ExecutorError as exc:
        ending = Ending(Status.failed, exc.reason, str(exc))
    return settle(ctx, job, ws, ending)


def _runner_of(ctx: Context, job: Job) -> Runner:
    runner = ctx.runners.get(job.runner)
    if runner is None or runner.model != job.model_requested:
        raise ConfigError(f"runner {job.runner!r} is no longer configured as it was when the job was "
                            f"accepted (model {job.model_requested!r}); resubmit the job")
    return runner


def _supervise(ctx: Context, job: Job, ws: Workspace, runner: Runner, policy: Policy, container,
               skip_lines: int = 0) -> Ending:
    stop = _StopCheck(ctx, job.id)
    watchdog = Watchdog(policy, on_beat=lambda beat: _record_beat(ctx, job, ws.attempt, beat))
    ctx.watchdogs[job.id] = watchdog
    try:
        run = watch_agent(
            ctx.sandbox, container, policy,
            on_events=lambda events, line: _record(ctx, job, ws.attempt, events, line),
            should_stop=stop, result_grace=ctx.settings.result_grace, watchdog=watchdog,
            skip_lines=skip_lines,
        )
    finally:
        ctx.watchdogs.pop(job.id, None)
        if ctx.redactor is not None:
            scrub_tree(ctx.settings.sessions_dir / job.session_id, ctx.redactor)
    _record_attempt(ctx, job, ws.attempt, run)
    ending = _judge_agent(job, runner, policy, run)
    if ending is not None and ending.reason in ("rate_limited", "overloaded"):
        ending = _rate_limited(ctx, job, ws.attempt, runner, policy, run)
    if ending is not None:
        return ending
    ctx.store.transition(job.id, Status.running, Status.testing)
    ctx.store.add_event(job, ws.attempt, "state", {"status": "testing"})
    log_state(job, Status.testing, ws.attempt)
    return _test_and_commit(ctx, job, ws, policy, stop)


def _test_and_commit(ctx: Context, job: Job, ws: Workspace, policy: Policy, stop: _StopCheck) -> Ending:
    tests = _run_test_gate(ctx, job, ws, policy, stop)
    ending = _judge_tests(tests)
    if ending is not None:
        return ending
    ending = _review_gate(ctx, job, ws, policy)
    if ending is not None:
        return ending
    return _commit(ctx, job, ws)


def _review_gate(ctx: Context, job: Job, ws: Workspace, policy: Policy) -> Ending | None:
    """After the tests passed: keep the tested change for a person (awaiting_review: the upper dir stays,
    the overlay and containers go), or None to commit it now."""
    if policy.review == "never":
        return None
    change = scan_upper(ws.upper)
    if change.refused or check_conflicts(change, ws.repo, job.start_ns or 0):
        return None  # _commit fails it, as it would without review
    lines = None
    if policy.review_max_changed_lines is not None:
        lines = review.changed_lines(review.diff_change(change, ws.upper, ws.repo))
    current = ctx.store.get(job.id)
    reasons = review.review_reasons(policy, change, current.final_text if current else None, lines)
    if not reasons:
        return None
    ctx.store.add_event(job, ws.attempt, "review", {"action": "awaiting", "reasons": reasons,
                                                    "changed_files": change.changed_files})
    return Ending(Status.awaiting_review, "review", "waiting for a person's review: " + review.reason_text(reasons),
                  keep_upper=True, fields={"review_reasons": reasons, "review_since": utcnow(),
                                           "changed_files": change.changed_files})


def _record_beat(ctx: Context, job: Job, attempt: int, beat: Beat) -> None:
    ctx.store.add_heartbeat(Heartbeat(job_id=job.id, attempt=attempt, state=beat.state, new_lines=beat.new_lines,
                                      cpu_cores=beat.cpu_cores, memory=beat.memory, pids=beat.pids,
                                      idle_for=beat.idle_for, last_activity=beat.last_activity))
    if beat.pids_limit_hits:
        _report_pids_limit(ctx, job, attempt, beat.pids_limit_hits, pids=beat.pids)


def _report_pids_limit(ctx: Context, job: Job, attempt: int, refused: int, pids: int | None = None) -> None:
    """A fork bomb (or a busy build) hit the pids limit: contained, and worth a line in the log once per
    count. ``refused`` -1 means the limit is exhausted right now (nothing could even be started to count)."""
    if ctx.pids_reported.get(job.id) == refused:
        return
    ctx.pids_reported[job.id] = refused
    ctx.store.add_event(job, attempt, "pids_limit", {"refused_forks": refused, "pids": pids,
                                                     "limit": job.policy.get("pids")})


def _record(ctx: Context, job: Job, attempt: int, events: list[Event], line: int) -> None:
    ctx.store.add_events(job, attempt, [(e.kind, e.data) for e in events], line=line)


def _record_attempt(ctx: Context, job: Job, number: int, run: AgentRun) -> None:
    state = run.state
    result = state.result or {}
    usage = result.get("usage") or {}
    attempt = ctx.store.attempts(job.id)[-1]
    ctx.store.finish_attempt(
        attempt.id, outcome=run.stopped or run.outcome.kind, exit_code=run.exit_code,
        claude_session_id=state.claude_session_id, models_seen=list(state.models_seen),
        cost_usd=result.get("total_cost_usd"), input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
    )
    seen = list(dict.fromkeys([*(job.models_seen or []), *state.models_seen]))
    ctx.store.update_job(job.id, models_seen=seen, final_text=state.final_text or None)
    ctx.store.add_event(job, number, "agent_end", {
        "outcome": run.outcome.kind, "message": run.outcome.message, "exit_code": run.exit_code,
        "stopped": run.stopped, "lingered": run.lingered, "oom_killed": run.oom_killed,
        "models_seen": state.models_seen, "stderr_tail": run.stderr_tail[-1000:],
        "refused_forks": run.refused_forks,
    })
    if run.refused_forks:
        _report_pids_limit(ctx, job, number, run.refused_forks)
    ctx.pids_reported.pop(job.id, None)


def _judge_agent(job: Job, runner: Runner, policy: Policy, run: AgentRun) -> Ending | None:
    """The ending an agent run leads to, or None when it earned a test run."""
    if run.stopped == "shutdown":
        return Ending(Status.queued, "interrupted", "the executor stopped during the attempt")
    if run.stopped == "cancelled":
        return Ending(Status.cancelled, "cancelled", "cancelled while the agent ran")
    if run.stopped == "stalled":
        alive = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.last_alive or time.time()))
        message = (f"no progress for {policy.stall_after:g}s (stall_after): last alive at {alive}, "
                   f"last activity: {run.last_activity or 'none'}; the container was killed and its changes "
                   "discarded" + ("; re-queued from the clean repository (retry_stalled)" if policy.retry_stalled else ""))
        return Ending(Status.queued if policy.retry_stalled else Status.stalled, "stalled", message)
    if run.stopped == "timeout":
        return Ending(Status.failed, "timeout", f"the agent ran longer than the policy's timeout "
                      f"({policy.timeout:g}s); its changes were rolled back")
    if run.oom_killed:
        return Ending(Status.failed, "out_of_memory", f"the agent container hit its memory limit "
                      f"({format_size(policy.memory)}) and was killed; raise the policy's memory")
    wrong = [m for m in run.state.models_seen if m not in (runner.model, SYNTHETIC_MODEL)]
    if wrong:
        err = ModelMismatch(runner.name, runner.model, wrong)
        return Ending(Status.failed, err.reason, str(err))
    outcome = run.outcome
    if outcome.kind == "success":
        return None
    if outcome.kind == "agent_error":
        limit = (f" (the container's pids limit of {policy.pids} refused {run.refused_forks} forks: a fork "
                 "bomb or runaway processes; raise the policy's pids if the work needs more)") if run.refused_forks else ""
        return Ending(Status.rolled_back, "agent_error", f"the agent did not succeed: {outcome.message}{limit}")
    label = outcome.kind.replace("_", " ")
    return Ending(Status.failed, outcome.kind, f"{runner.name} failed: {label}: {outcome.message}")


def _rate_limited(ctx: Context, job: Job, attempt: int, runner: Runner, policy: Policy, run: AgentRun) -> Ending:
    """Weather: record it, cool the runner down, and wait to retry against the same runner."""
    outcome = run.outcome
    now = utcnow()
    error = outcome.to_error(runner=runner.name)
    usage_limit = outcome.resets_at is not None
    counted = job.limited_attempts + (0 if usage_limit else 1)
    decision = retry.decide(policy, error, counted, now, resets_at=outcome.resets_at,
                            retry_after=outcome.retry_after)
    statuses = run.state.api_error_statuses or [r.get("error_status") for r in run.state.api_retries]
    ctx.store.add_rate_limit(RateLimitEvent(
        runner=runner.name, job_id=job.id, attempt=attempt,
        kind="usage_limit" if usage_limit else outcome.kind,
        status_code=next((s for s in reversed(statuses) if s), None),
        retry_delay=round(decision.delay, 3) if decision.retry else None, message=outcome.message[:500]))
    ctx.store.update_job(job.id, limited_attempts=counted if decision.counts else job.limited_attempts)
    label = "rate limited" if outcome.kind == "rate_limited" else "overloaded"
    if not decision.retry:
        return Ending(Status.failed, outcome.kind,
                      f"{runner.name} failed: {label} after {counted} attempts: {outcome.message}")
    until = now + timedelta(seconds=decision.delay)
    # A rate limit is account-wide: no other job of this runner starts before the cooldown ends.
    ctx.store.cool_down(runner.name, until, f"{label}: {outcome.message[:200]}")
    message = (f"{runner.name} {label}; attempt {attempt} rolled back to wait {decision.delay:.0f}s "
               f"({decision.why}); retry at {until:%Y-%m-%dT%H:%M:%SZ} against the same runner")
    ctx.store.add_event(job, attempt, "rate_limit", {"runner": runner.name, "kind": outcome.kind,
                                                     "delay": decision.delay, "why": decision.why,
                                                     "retry_at": until.isoformat(), "message": outcome.message})
    return Ending(Status.waiting_retry, outcome.kind, message, keep_upper=True,
                  fields={"retry_at": until, "resume_session": run.state.claude_session_id})


def _run_test_gate(ctx: Context, job: Job, ws: Workspace, policy: Policy, stop: _StopCheck) -> TestRun:
    workspace.create_test_view(ctx.sandbox, ws)
    try:
        tests = run_tests(ctx.sandbox, ws, job.test_command or "true", policy, should_stop=stop)
    finally:
        workspace.discard_test_view(ctx.sandbox, ws)
    ctx.store.update_job(job.id, test_exit_code=tests.exit_code, test_output=tests.output_tail)
    ctx.store.add_event(job, ws.attempt, "tests", {
        "command": tests.command, "exit_code": tests.exit_code, "timed_out": tests.timed_out,
        "oom_killed": tests.oom_killed, "duration": round(tests.duration, 3),
        "output_tail": tests.output_tail[-1000:],
    })
    return tests


def _judge_tests(tests: TestRun) -> Ending | None:
    if tests.stopped == "shutdown":
        return Ending(Status.queued, "interrupted", "the executor stopped during the tests")
    if tests.stopped == "cancelled":
        return Ending(Status.cancelled, "cancelled", "cancelled while the tests ran")
    if tests.timed_out:
        return Ending(Status.rolled_back, "tests_timeout", f"the tests ran longer than the policy's test_timeout")
    if tests.oom_killed:
        return Ending(Status.rolled_back, "tests_out_of_memory", "the tests hit the memory limit")
    if not tests.passed:
        return Ending(Status.rolled_back, "tests_failed", f"the tests failed (exit {tests.exit_code}): "
                      f"{tests.command}")
    return None


def _commit(ctx: Context, job: Job, ws: Workspace) -> Ending:
    change = scan_upper(ws.upper)
    if change.refused:
        return Ending(Status.failed, "unsafe_path", "the change holds entries that are never applied: " +
                      ", ".join(f"{r.path} ({r.reason})" for r in change.refused))
    conflicts = check_conflicts(change, ws.repo, job.start_ns or 0)
    if conflicts:
        return Ending(Status.failed, "conflict", str(Conflict(conflicts)), keep_upper=True)
    ctx.store.transition(job.id, Status.testing, Status.committing, changed_files=change.changed_files)
    ctx.store.add_event(job, ws.attempt, "state", {"status": "committing", "changed_files": change.changed_files,
                                                   "ignored_git": change.ignored_git})
    log_state(job, Status.committing, ws.attempt, changed=len(change.changed_files))
    return finish_commit(ctx, job, ws, change)


def finish_commit(ctx: Context, job: Job, ws: Workspace, change: Change | None = None) -> Ending:
    """Apply the kept upper dir (again, after a crash: the apply is idempotent) and settle."""
    # A partial approval (review.py) applies only the approved paths, also when redone after a crash.
    change = change or review.select(scan_upper(ws.upper), job.review_files)
    try:
        apply_change(change, ws.upper, ws.repo, ws.uid, ws.gid)
    except (UnsafePath, OSError) as exc:
        return Ending(Status.failed, "commit_failed", f"the change could not be applied: {exc}", keep_upper=True)
    return Ending(Status.succeeded, "committed")


def settle(ctx: Context, job: Job, ws: Workspace, ending: Ending) -> Job:
    """Clean up the attempt's containers and overlay, then record the ending (in that order: a crash in
    between leaves a job the restart recovery resolves)."""
    if ending.keep_upper:
        workspace.release(ctx.sandbox, ws)
    else:
        workspace.discard(ctx.sandbox, ws)
    current = ctx.store.get(job.id)
    assert current is not None
    fields = {} if ending.status == Status.queued else {"reason": ending.reason, "error": ending.error}
    fields.update(ending.fields)
    try:
        settled = ctx.store.transition(job.id, current.status, ending.status, **fields)
    except IllegalTransition as exc:
        log.error("cannot settle job", extra={"action": "settle_refused", "job": job.id, "error": str(exc)})
        raise
    ctx.store.add_event(settled, ws.attempt, "state", {"status": ending.status.value, "reason": ending.reason,
                                                        "error": ending.error})
    log_state(settled, ending.status, ws.attempt, reason=ending.reason, error=ending.error)
    if ctx.notifier is not None and ending.status in (Status.awaiting_review, Status.failed):
        ctx.notifier.job_event(settled)  # queued for a background thread: never blocks or fails the job
    return settled
