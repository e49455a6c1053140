"""One job's life: workspace, agent, test gate, then commit or rollback.

Owns the order of a job's steps and the phase it is in (``store/status.py`` draws the whole machine):

    queued -> running -> testing -> (awaiting_review) -> committing -> succeeded
                 |-> waiting_retry (rate limited: slot freed, upper kept) -> running (same runner, resumed)
                 |-> rolled_back / failed / stalled / cancelled / queued again (the executor is stopping)

A sealed attempt's gateway and egress proxy (``sealed.py``) listen from before its container starts until
its agent ends. Only an agent that reported success *and* a passing test gate lead to a commit
(``transaction/commit.py``): the test command's exit 0, or with ``evaluation = "tests"`` the graded gate's
rules (``grading.py``); anything else removes the job's overlay and leaves the repository as it was. Every
ending is an error of the tree (``errors.py``) or one of its two non-error reasons.

Every move an attempt makes is fenced by its owner (this host, this attempt number): a host found lost
whose job was taken over meanwhile can move the job nowhere, above all not to ``committing``.

Must never: commit without a passing test run, run a job this host did not claim (the claim moved it to
``running``), or hide why a job ended.
"""

from __future__ import annotations

import errno
from datetime import timedelta

from ..agent.registry import agent_for
from ..agent.seam import Agent, LaunchRequest
from ..clock import utcnow
from ..errors import (
    AWAITING_REVIEW,
    ChangeGone,
    ConfigError,
    DiskLimit,
    EngineUnavailable,
    ExecutorError,
    IllegalTransition,
    Interrupted,
    RateLimited,
    SandboxError,
    StoreUnavailable,
    Unsettled,
)
from ..logs import log_state
from ..policy import Policy, Runner
from ..redact import scrub_tree
from ..review.diff import changed_lines, diff_change
from ..review.triggers import REVIEW_INSTRUCTION, reason_text, review_reasons
from ..sandbox.disk import meter_for
from ..sandbox.health import engine_error
from ..sandbox.liveness import Watchdog
from ..sandbox.runtime import AgentRun, agent_spec, run_tests, watch_agent
from ..session import compaction
from ..settings import format_size
from ..store import Job, RateLimitEvent, Status
from ..store.health import unavailable
from ..transaction import landing, workspace
from ..transaction.commit import Ending, Phase, commit, has_conflicts, settle
from ..transaction.upper import scan_upper
from ..transaction.workspace import Workspace
from . import retry
from .context import Context
from .grading import graded_gate
from .judge import judge_agent, judge_tests
from .record import record_attempt, record_beat, record_events, record_tests
from .sealed import SealedAttempt
from .stop import StopCheck

#: What the agent is told when its conversation is resumed after a rate limit.
RESUME_PROMPT = ("Your previous attempt at this task was interrupted by an API rate limit. The workspace is as "
                 "you left it. Continue where you stopped and finish the task:\n\n{prompt}")
#: What a reviewer's follow-up is told: its prompt is the reviewer's note, the task is the reviewed job's.
REVISE_PROMPT = ("A person reviewed the change made for the task below and asked for changes. That change is in "
                 "the workspace as it was left; it has not been applied to the repository. Revise it as the "
                 "reviewer asks.\n\nThe reviewer's note:\n\n{note}\n\nThe task:\n\n{task}")


def run_job(ctx: Context, job_id: str) -> Job:
    """Run one attempt of a job this host claimed (``Store.claim`` moved it to ``running``, counted the
    attempt and kept, for a resumed one, the conversation and the moment its changes started) to a settled
    status (or back to queued on shutdown)."""
    job = ctx.store.get(job_id)
    assert job is not None and job.status == Status.running and job.host_id == ctx.settings.host_id
    number = job.attempts
    resume = job.resume_session
    phase = Phase(Status.running, owner=(ctx.settings.host_id, number))
    if resume:
        ctx.store.update_job(job.id, resume_session=None)
    ctx.store.start_attempt(job.id, number, ctx.settings.host_id)
    ctx.store.add_event(job, number, "state", {"status": "running", "attempt": number, "resume": resume})
    log_state(job, Status.running, number)
    ws = Workspace.of(ctx.settings, job, number)
    return _settled(ctx, job, ws, phase, lambda: _attempt(ctx, job, ws, phase, resume))


def adopt_job(ctx: Context, job_id: str, container) -> Job:
    """Supervise again an agent container that outlived an executor restart (a sealed one gets its sockets
    again, at the same paths: its forwarder connects by path for every connection)."""
    job = ctx.store.get(job_id)
    assert job is not None
    ws = Workspace.of(ctx.settings, job)
    ctx.store.add_event(job, ws.attempt, "adopted", {"container": container.name})
    log_state(job, "adopted", ws.attempt)
    phase = Phase(Status.running, owner=(ctx.settings.host_id, job.attempts))
    skip = ctx.store.last_stream_line(job.id, ws.attempt)

    def adopt() -> Ending:
        runner, policy = _runner_of(ctx, job), Policy(**job.policy)
        agent = agent_for(runner)
        seal = SealedAttempt.open(ctx, job, ws, runner, policy, agent)
        return _supervise(ctx, job, ws, phase, runner, policy, agent, container, skip_lines=skip, seal=seal,
                          adopted=True)

    return _settled(ctx, job, ws, phase, adopt)


def retest_job(ctx: Context, job_id: str) -> Job:
    """Run the test gate again for a job whose tests were interrupted by an executor restart."""
    job = ctx.store.get(job_id)
    assert job is not None
    ws = Workspace.of(ctx.settings, job)
    ctx.store.add_event(job, ws.attempt, "adopted", {"phase": "testing"})
    phase = Phase(Status.testing, owner=(ctx.settings.host_id, job.attempts))
    return _settled(ctx, job, ws, phase, lambda: _test_and_commit(ctx, job, ws, phase, Policy(**job.policy),
                                                                 StopCheck(ctx, job.id, job.attempts)))


def _settled(ctx: Context, job: Job, ws: Workspace, phase: Phase, attempt) -> Job:
    """Run the attempt and record how it ended. An ending is recorded only if the engine answered throughout
    (``EngineHealth.vouch``): when it went away, or the store did, the job is handed back to the serving loop
    (``EngineUnavailable``/``StoreUnavailable``), which adopts or rolls it back once both answer; an ending
    that could not be recorded is handed back with it (``Unsettled``)."""
    since = ctx.engine.epoch
    try:
        ending = attempt()
    except (EngineUnavailable, StoreUnavailable):
        raise
    except ExecutorError as exc:
        ending = Ending.of(exc)
    except Exception as exc:  # noqa: BLE001 - the machine's faults end the attempt; _machine_fault raises a bug
        ending = _machine_fault(ctx, exc, since)
    if phase.status != Status.committing:  # a commit underway is finished whatever the engine did
        ctx.engine.vouch(since)
    try:
        return settle(ctx.store, job, ws, ending, phase, ctx.sandbox, ctx.settled)
    except Exception as exc:
        if isinstance(exc, IllegalTransition) or not (engine_error(exc) or unavailable(exc) or _disk_full(exc)):
            raise
        raise Unsettled(f"the attempt ended ({ending.reason}) but could not be recorded: {exc}", ending,
                        phase.status) from exc


def _machine_fault(ctx: Context, exc: Exception, since: int) -> Ending:
    """The ending of an attempt cut short by the machine rather than the job: the engine (``SandboxError`` when
    it answers, else handed back), the store (handed back), a full state root (rolled back and re-queued);
    anything else is a bug and is raised."""
    if unavailable(exc):
        raise StoreUnavailable(f"the store failed during the attempt: {exc}") from exc
    if engine_error(exc):
        ctx.engine.vouch(since)
        return Ending.of(SandboxError(f"the container engine refused: {exc}"))
    if _disk_full(exc):
        return Ending.of(Interrupted(f"the state root's file system is full ({exc}); the attempt was rolled back "
                                     "and the job waits for space"))
    raise exc


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _runner_of(ctx: Context, job: Job) -> Runner:
    runner = ctx.runners.get(job.runner)
    if runner is None or runner.model != job.model_requested or runner.agent != job.agent:
        raise ConfigError(f"runner {job.runner!r} is no longer configured as it was when the job was "
                          f"accepted (agent {job.agent!r}, model {job.model_requested!r}); resubmit the job")
    return runner


def _attempt(ctx: Context, job: Job, ws: Workspace, phase: Phase, resume: str | None) -> Ending:
    runner = _runner_of(ctx, job)
    agent = agent_for(runner)
    policy = Policy(**job.policy)
    homes = [ws.home_upper, ws.home]  # the attempt's own layer (a resumed one keeps it), then the committed home
    if resume and not (agent.transcript_readable(homes, resume) and ws.upper.is_dir()):
        ctx.store.add_event(job, ws.attempt, "resume_unavailable", {
            "agent_session_id": resume,
            "why": "the session transcript or the kept workspace cannot be read: starting fresh from the "
                   "clean repository"})
        resume = None
    keep = resume is not None
    if job.builds_on:  # a revision continues the reviewed job's change (and its own, after a restart)
        if not workspace.take_over(ctx.settings.job_dir(job.builds_on), ws):
            raise ChangeGone(f"the change of job {job.builds_on} this job was to revise is gone (removed by "
                             f"retention or by hand); submit the task again")
        keep = True
    landing.begin(ctx.store, job, ws, keep)  # where HEAD is as the job starts (policy land = "commit"/"branch")
    workspace.create(ctx.sandbox, ws, keep_upper=keep, disk=policy.disk if ctx.disk_images else None)
    # A follow-up job of a session starts from the session brief (or continues the previous conversation).
    start = compaction.start(ctx.store, ctx.settings, ctx.secrets, job, policy, ws.attempt, runner,
                             transcript_ok=lambda sid: agent.transcript_readable(homes, sid), resuming=resume is not None)
    prompt = job.prompt
    if job.builds_on:
        reviewed = ctx.store.get(job.builds_on)
        prompt = REVISE_PROMPT.format(note=job.prompt, task=reviewed.prompt if reviewed else "(not recorded)")
    if resume:
        prompt = RESUME_PROMPT.format(prompt=prompt)
    if start.prompt_note:
        prompt = f"{start.prompt_note}\n\n{prompt}"
    system = "\n\n".join(system_prompt_parts(policy, brief=start.brief)) or None
    # A sealed job's sockets listen before its container starts; they go when its agent ends.
    seal = SealedAttempt.open(ctx, job, ws, runner, policy, agent)
    try:
        launch = agent.launch(LaunchRequest(prompt, runner, policy, ctx.secrets, sealed=seal is not None,
                                            resume=resume or start.resume, system=system))
        config = workspace.write_agent_config(ws, launch.files)
        spec = agent_spec(ws, policy, launch, sockets=str(seal.directory) if seal else None,
                          config=str(config) if config else None)
        container = ctx.sandbox.start(spec)
    except BaseException:
        if seal is not None:
            seal.close()
        raise
    return _supervise(ctx, job, ws, phase, runner, policy, agent, container, seal=seal)


def system_prompt_parts(policy: Policy, brief: str | None = None) -> list[str]:
    """What the executor adds to the agent's system prompt, in order."""
    parts: list[str] = []
    if policy.review != "never":
        parts.append(REVIEW_INSTRUCTION)  # the model may send its change to a person (review/triggers.py)
    if brief:
        parts.append(brief)  # the session brief (session/brief.py): last, it is the longest part
    return parts


def _supervise(ctx: Context, job: Job, ws: Workspace, phase: Phase, runner: Runner, policy: Policy, agent: Agent,
               container, skip_lines: int = 0, seal: SealedAttempt | None = None, adopted: bool = False) -> Ending:
    stop = StopCheck(ctx, job.id, ws.attempt, refused=seal.refused if seal else None)
    watchdog = Watchdog(policy, on_beat=lambda beat: record_beat(ctx, job, ws.attempt, beat),
                        disk=meter_for(ws.layers, policy.disk))
    ctx.watchdogs[job.id] = watchdog
    if seal is not None:
        seal.watchdog = watchdog
    try:
        run = watch_agent(
            ctx.sandbox, container, policy, agent,
            on_events=lambda batch: record_events(ctx, job, ws.attempt, batch),
            should_stop=stop, result_grace=ctx.settings.result_grace, watchdog=watchdog,
            skip_lines=skip_lines, adopted=adopted,
        )
    finally:
        ctx.watchdogs.pop(job.id, None)
        if seal is not None:
            seal.close()  # its requests, refusals and egress decisions are in the store from here on
        unscrubbed = _scrub_home(ctx, ws, policy) if ctx.redactor is not None else None
    record_attempt(ctx, job, ws.attempt, run, answered=seal.models if seal else [])
    if unscrubbed is not None and run.stopped not in ("disk_limit", "disk_reserve"):
        raise unscrubbed  # (stopped at the cap, the judge says so with the figure)
    try:
        judge_agent(runner, policy, run, refused=seal.refused_models if seal else None,
                    answered=seal.answered_models if seal else None, gateway_gap=adopted and seal is not None)
    except RateLimited as limited:
        return _rate_limited(ctx, job, ws.attempt, runner, policy, run, limited)
    job = phase.move(ctx.store, job, Status.testing)
    ctx.store.add_event(job, ws.attempt, "state", {"status": "testing"})
    log_state(job, Status.testing, ws.attempt)
    return _test_and_commit(ctx, job, ws, phase, policy, stop)


def _scrub_home(ctx: Context, ws: Workspace, policy: Policy) -> DiskLimit | None:
    """Redact the attempt's home layer. A disk too full for a rewritten copy is the error the job ends with (a
    home that could not be scrubbed is never carried on)."""
    try:
        scrub_tree(ws.home_upper, ctx.redactor, ws.uid, ws.gid)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return DiskLimit(f"the job's disk (the policy's disk limit of {format_size(policy.disk)}) has no room left "
                         "to redact its home layer; it was stopped and its changes discarded; raise the policy's "
                         "disk if the work needs more")
    return None


def _test_and_commit(ctx: Context, job: Job, ws: Workspace, phase: Phase, policy: Policy,
                     stop: StopCheck) -> Ending:
    if policy.evaluation == "tests":
        forced = graded_gate(ctx, job, ws, policy, stop)  # raises the rule the change broke
    else:
        forced = []
        workspace.create_test_view(ctx.sandbox, ws)
        try:
            tests = run_tests(ctx.sandbox, ws, job.test_command or "true", policy, should_stop=stop,
                              disk=meter_for(ws.layers, policy.disk))
        finally:
            workspace.discard_test_view(ctx.sandbox, ws)
        record_tests(ctx, job, ws.attempt, tests)
        judge_tests(tests, policy)
    ending = _review_gate(ctx, job, ws, policy, forced)
    if ending is not None:
        return ending
    return commit(ctx.store, job, ws, phase)


def _review_gate(ctx: Context, job: Job, ws: Workspace, policy: Policy, forced: list[dict]) -> Ending | None:
    """After the tests passed: keep the tested change for a person (awaiting_review: the upper dir stays,
    the overlay and containers go), or None to commit it now. ``forced``: reasons the gate already found
    (weak tests the policy sends to a person), whatever the policy's ``review``."""
    if policy.review == "never" and not forced:
        return None
    change = scan_upper(ws.upper)
    if change.refused or has_conflicts(ws, change, job.start_ns or 0):
        return None  # the commit fails it, as it would without review
    lines = None
    if policy.review_max_changed_lines is not None:
        with ws.trees() as (upper, repo):
            lines = changed_lines(diff_change(change, upper, repo))
    current = ctx.store.get(job.id)
    reasons = forced + review_reasons(policy, change, current.final_text if current else None, lines)
    if not reasons:
        return None
    ctx.store.add_event(job, ws.attempt, "review", {"action": "awaiting", "reasons": reasons,
                                                    "changed_files": change.changed_files})
    return Ending(Status.awaiting_review, AWAITING_REVIEW, "waiting for a person's review: " + reason_text(reasons),
                  keep_upper=True, fields={"review_reasons": reasons, "review_since": utcnow(),
                                           "changed_files": change.changed_files})


def _rate_limited(ctx: Context, job: Job, attempt: int, runner: Runner, policy: Policy, run: AgentRun,
                  error: RateLimited) -> Ending:
    """Weather: record it, cool the runner down, and wait to retry against the same runner."""
    outcome = run.outcome
    now = utcnow()
    usage_limit = outcome.resets_at is not None
    counted = job.limited_attempts + (0 if usage_limit else 1)
    decision = retry.decide(policy, error, counted, now, resets_at=outcome.resets_at,
                            retry_after=outcome.retry_after)
    statuses = run.state.error_statuses
    fields = dict(kind="usage_limit" if usage_limit else outcome.kind,
                  retry_delay=round(decision.delay, 3) if decision.retry else None, message=outcome.message[:500])
    # A sealed job's gateway wrote the row when the 429 passed; it gets the wait decided here.
    if not ctx.store.settle_rate_limit(job.id, attempt, **fields):
        ctx.store.add_rate_limit(RateLimitEvent(runner=runner.name, job_id=job.id, attempt=attempt,
                                                status_code=next((s for s in reversed(statuses) if s), None),
                                                **fields))
    ctx.store.update_job(job.id, limited_attempts=counted if decision.counts else job.limited_attempts)
    label = "rate limited" if outcome.kind == "rate_limited" else "overloaded"
    if not decision.retry:
        error.message = f"{runner.name} failed: {label} after {counted} attempts: {outcome.message}"
        return Ending.of(error)
    until = now + timedelta(seconds=decision.delay)
    # A rate limit is account-wide: no other job of this runner starts before the cooldown ends.
    ctx.store.cool_down(runner.name, until, f"{label}: {outcome.message[:200]}")
    message = (f"{runner.name} {label}; attempt {attempt} rolled back to wait {decision.delay:.0f}s "
               f"({decision.why}); retry at {until:%Y-%m-%dT%H:%M:%SZ} against the same runner")
    ctx.store.add_event(job, attempt, "rate_limit", {"runner": runner.name, "kind": outcome.kind,
                                                     "delay": decision.delay, "why": decision.why,
                                                     "retry_at": until.isoformat(), "message": outcome.message})
    return Ending(Status.waiting_retry, error.reason, message, keep_upper=True,
                  fields={"retry_at": until, "resume_session": run.state.session_id})
