"""What a running attempt leaves in the store: its stream's events, heartbeats, the attempt row, tests.

Owns turning what the runtime saw (events, heartbeats, the agent's end, the test run) into rows and
events, including the one ``pids_limit`` event per count of forks the limit refused.

Must never: change a job's status (that is the pipeline's, through its phase), or store a credential (the
store redacts what it writes).
"""

from __future__ import annotations

from ..agent.events import Event
from ..sandbox.liveness import Beat
from ..sandbox.runtime import AgentRun, TestRun
from ..store import Heartbeat, Job
from .context import Context


def record_events(ctx: Context, job: Job, attempt: int, batch: list[tuple[list[Event], int]]) -> None:
    """The events of a few consecutive stream lines, each with its line number, in one transaction."""
    ctx.store.add_stream_events(job, attempt, [(line, [(e.kind, e.data) for e in events]) for events, line in batch])


def record_beat(ctx: Context, job: Job, attempt: int, beat: Beat) -> None:
    ctx.store.add_heartbeat(Heartbeat(job_id=job.id, attempt=attempt, state=beat.state, new_lines=beat.new_lines,
                                      cpu_cores=beat.cpu_cores, memory=beat.memory, pids=beat.pids,
                                      idle_for=beat.idle_for, last_activity=beat.last_activity, disk=beat.disk))
    if beat.pids_limit_hits:
        report_pids_limit(ctx, job, attempt, beat.pids_limit_hits, pids=beat.pids)


def report_pids_limit(ctx: Context, job: Job, attempt: int, refused: int, pids: int | None = None) -> None:
    """A fork bomb (or a busy build) hit the pids limit: contained, and worth a line in the log once per
    count. ``refused`` -1 means the limit is exhausted right now (nothing could even be started to count)."""
    if ctx.pids_reported.get(job.id) == refused:
        return
    ctx.pids_reported[job.id] = refused
    ctx.store.add_event(job, attempt, "pids_limit", {"refused_forks": refused, "pids": pids,
                                                     "limit": job.policy.get("pids")})


def record_attempt(ctx: Context, job: Job, number: int, run: AgentRun, answered: list[str] | None = None) -> None:
    """The attempt's end. ``answered``: models other than the runner's that the job's gateway saw answer (where
    the agent's stream never names the model, they are the evidence)."""
    state = run.state
    models = list(dict.fromkeys([*state.models_seen, *(answered or [])]))
    attempt = ctx.store.attempts(job.id)[-1]
    ctx.store.finish_attempt(
        attempt.id, outcome=run.stopped or run.outcome.kind, exit_code=run.exit_code,
        agent_session_id=state.session_id, models_seen=models,
        cost_usd=state.cost_usd, input_tokens=state.input_tokens, output_tokens=state.output_tokens,
    )
    seen = list(dict.fromkeys([*(job.models_seen or []), *models]))
    ctx.store.update_job(job.id, models_seen=seen, final_text=state.final_text or None)
    ctx.store.add_event(job, number, "agent_end", {
        "outcome": run.outcome.kind, "message": run.outcome.message, "exit_code": run.exit_code,
        "stopped": run.stopped, "lingered": run.lingered, "oom_killed": run.oom_killed,
        "models_seen": models, "stderr_tail": run.stderr_tail[-1000:],
        "refused_forks": run.refused_forks,
    })
    if run.refused_forks:
        report_pids_limit(ctx, job, number, run.refused_forks)
    ctx.pids_reported.pop(job.id, None)


def record_tests(ctx: Context, job: Job, attempt: int, tests: TestRun) -> None:
    ctx.store.update_job(job.id, test_exit_code=tests.exit_code, test_output=tests.output_tail)
    ctx.store.add_event(job, attempt, "tests", {
        "command": tests.command, "exit_code": tests.exit_code, "timed_out": tests.timed_out,
        "oom_killed": tests.oom_killed, "duration": round(tests.duration, 3),
        "output_tail": tests.output_tail[-1000:],
    })
