"""Session briefs: how a follow-up job learns what its session did before it, without the whole history.

A job whose ``session_id`` names a session that already has settled jobs is a follow-up. The policy's
``context`` (or the job's ``context: "full"``) chooses how it starts:

* ``compact`` (default): a fresh conversation; the agent's system prompt is extended with the session brief
  built here from the session's event log:

  - files that were read but not changed: a few key points each, written by the small model (what the
    file is, what mattered about it to the task), never the content;
  - files changed: their paths, and which job changed them;
  - settled jobs: one line each ("requested X, implemented Y (files), tests: pass/fail", or why it was
    rolled back), written by the small model;
  - the test command and its last outcome;
  - skills (``policies/skills/NAME.md``): in full for the skills the job names, one line (the file's
    description) for every other skill of the session;
  - the last job's final message and the open items it named, verbatim.

* ``resume``: continue the previous job's conversation as it is, where the agent can (the same agent ran the
  previous job and its transcript reads); else ``compact``.
* ``full``: a fresh conversation carrying the raw history (the event log as stored) instead of a brief.

The small model (the runner's ``compaction_model``, a pinned model id; ``EXECUTOR_COMPACTION_MODEL`` for
Claude Code runners that name none) is reached through the runner's own provider (its agent's summarizer) at
the runner's endpoint with the runner's credential, with the runners' discipline: tenacity backoff on weather
against the same model, never another model, the model that answered checked and recorded. When
it cannot be had, the job starts with the *structural* brief (same sections, paths and one-liners instead of
summaries) and its record says ``compaction: structural: <why>``; with the policy's ``compaction_required``
the job fails instead. Every item of a brief is a ``Compaction`` row beside the event ids it replaced.

Must never: put a file's content into a brief (the raw history of ``full`` excepted), fall back to
another model, or hide that a brief was made without the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..agent.registry import agent_for
from ..errors import CompactionUnavailable
from ..policy import Policy, Runner
from ..settings import Settings
from ..store import Job, Store
from .brief import build, raw_history, render, size
from .history import History, earlier_jobs, history
from .summarizer import Summarizer

log = logging.getLogger(__name__)

#: A brief travels as one command-line argument; Linux refuses one over 128 KiB.
BRIEF_LIMIT = 100_000


@dataclass
class Start:
    """How a job's conversation starts: the agent's session to continue and/or a brief to add."""

    resume: str | None = None
    brief: str | None = None  # added to the system prompt
    #: put before the prompt: a resumed conversation keeps the system prompt it started with (the agents do not
    #: apply a new one to it), so what must reach it goes in the prompt
    prompt_note: str | None = None


def mode_of(job: Job, policy: Policy) -> str:
    return "full" if job.context == "full" else policy.context


def start(store: Store, settings: Settings, secrets: Mapping[str, str], job: Job, policy: Policy, attempt: int,
          runner: Runner, transcript_ok: Callable[[str], bool], resuming: bool = False,
          summarizer: Summarizer | None = None) -> Start:
    """Decide how the job's conversation starts, build its brief if it gets one, and record how.

    ``resuming``: this attempt continues the job's own rate-limited conversation; the brief made for its
    first attempt is used again (no second model call)."""
    made = [e for e in store.events(job_id=job.id) if e.kind == "compaction"]
    if made:
        if resuming:  # the job's own conversation goes on: it already holds its brief
            return Start()
        if made[-1].data.get("mode") != "resume":
            return Start(brief=made[-1].data.get("brief"))
    skills_dir = settings.policies / "skills"
    jobs = earlier_jobs(store, job, job.session_id)
    if not jobs and not job.skills:
        return Start()
    mode = mode_of(job, policy)
    if jobs and mode == "resume":
        previous = next((a.agent_session_id for a in reversed(store.attempts(jobs[-1].id)) if a.agent_session_id), None)
        if previous and jobs[-1].agent == job.agent and transcript_ok(previous):
            # The conversation goes on as it is; the skills the job names still ride along in full, in the
            # prompt (a resumed conversation keeps the system prompt it was started with).
            text = _skills_only(store, job, jobs, skills_dir) if job.skills else None
            _record(store, job, attempt, {"mode": "resume", "agent_session_id": previous, "previous_job": jobs[-1].id,
                                          **({"prompt_note": text, "brief_size": size(text)} if text else {})})
            return Start(resume=previous, prompt_note=text)
        why = ("the previous job's transcript cannot be read" if jobs[-1].agent == job.agent else
               f"the previous job ran another agent ({jobs[-1].agent})")
        store.add_event(job, attempt, "resume_unavailable", {
            "agent_session_id": previous, "why": f"{why}: starting with the compacted brief instead"})
        mode = "compact"
    if jobs and mode == "full":
        text = raw_history(store, job.session_id, jobs)
        if size(text) > BRIEF_LIMIT - 5000:  # keep the most recent history, and say so
            tail = text.encode()[-(BRIEF_LIMIT - 5000):].decode("utf-8", "ignore")
            text = (f"[the raw history is {size(text)} bytes; only its last {BRIEF_LIMIT - 5000} bytes fit "
                    f"the system prompt; `executor session {job.session_id} --full` prints all of it]\n{tail}")
        if job.skills:
            text += "\n" + _skills_only(store, job, jobs, skills_dir)
        _record(store, job, attempt, {"mode": "full", "brief": text, "brief_size": size(text)})
        return Start(brief=text)
    reason = None
    if summarizer is None and jobs:
        try:
            summarizer = agent_for(runner).summarizer(settings, secrets, runner)
        except CompactionUnavailable as exc:
            reason = str(exc)
    brief = build(store, job.session_id, job, skills_dir, summarizer)
    if brief is None:
        return Start()
    if reason is not None and brief.mode == "structural":
        brief.reason = reason
        brief.text = render(brief.history, brief.items, skills_dir, job.skills or [], "structural", reason)
    if size(brief.text) > BRIEF_LIMIT:
        brief.text = (brief.text.encode()[:BRIEF_LIMIT - 200].decode("utf-8", "ignore")
                      + "\n[brief cut at the command line's limit: skills in full are the likely cause]\n")
    if brief.mode == "structural" and policy.compaction_required:
        _record(store, job, attempt, {"mode": "failed", "reason": brief.reason})
        raise CompactionUnavailable(f"the session brief could not be written by the small model "
                                    f"(compaction_required): {brief.reason}")
    store.add_compactions(brief.rows)
    models = sorted({r.model for r in brief.rows if r.model})
    _record(store, job, attempt, {
        "mode": brief.mode, "reason": brief.reason, "brief": brief.text, "brief_size": size(brief.text),
        "source_size": sum(r.source_size for r in brief.rows), "rows": len(brief.rows), "models": models,
        "cost_usd": brief.cost_usd, "latency": brief.latency,
        "reused": sum(1 for r in brief.rows if r.reused_from)})
    return Start(brief=brief.text)


def _skills_only(store: Store, job: Job, jobs: list[Job], skills_dir: Path) -> str:
    h = history(store, job.session_id, jobs, job.skills or [])
    return render(History(h.session_id, [], {}, h.skills), [], skills_dir, job.skills or [], "static", None)


def _record(store: Store, job: Job, attempt: int, data: dict) -> None:
    store.add_event(job, attempt, "compaction", data)
    label = data["mode"] + (f": {data['reason']}" if data.get("reason") else "")
    store.update_job(job.id, compaction=label[:1000])
    log.info("session context %s", data["mode"], extra={"action": "compaction", "job": job.id,
                                                        "session": job.session_id, "mode": data["mode"]})

