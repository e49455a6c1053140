"""New jobs made from earlier ones: a retry (the same task again) and a revision (a reviewer's follow-up).

Owns turning an ended or reviewed job back into a job spec that goes through intake's own checks, so a job
made from another is judged exactly as a job file would be today (the runner still configured, the policy
as it reads now, the workspace still under a root and reached without a link). Both stay in the job's
session: the new job starts from the session's brief, which says how the earlier one ended.

* ``retry_spec`` / ``retry``: an unsuccessful job's task again, as a new job (``follows`` names the one it
  retries). ``executor retry`` spools the spec like ``submit``; the page validates it in the executor.
* ``revision``: the follow-up a reviewer's "request changes" queues: the reviewer's note is its prompt, and
  it continues the reviewed job's kept change (``builds_on``), judged for conflicts from the moment that
  change began. It must be the same repository directory the change was made in.

Must never: insert or spool anything (the callers decide when: a revision goes in with the reviewed job's
ending, in one transaction), or make a job intake would refuse.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidJob
from ..policy import Runner
from ..settings import Settings
from ..store import Job, Status
from .jobs import new_job_id, parse_spec, validate
from .spool import job_from
from .storage import identify

#: The endings a retry is offered for: the job did not succeed and nothing of it is waiting for anyone.
RETRYABLE = frozenset({Status.failed, Status.rolled_back, Status.stalled, Status.cancelled})


def retry_spec(job: Job) -> dict[str, Any]:
    """The job file that runs ``job``'s task again (``InvalidJob`` saying why when it cannot be retried)."""
    if job.status not in RETRYABLE:
        raise InvalidJob(f"job {job.id} is {job.status.value}: only a failed, rolled back, stalled or cancelled "
                         "job can be retried" + (" (resubmit the job file once it is fixed)"
                                                 if job.status == Status.rejected else ""))
    if job.builds_on:
        raise InvalidJob(f"job {job.id} revised the change of job {job.builds_on}, which ended with it: retry "
                         f"job {job.builds_on}'s task instead (`executor retry {job.builds_on}`)")
    return _spec(job, job.prompt)


def retry(job: Job, settings: Settings, runners: dict[str, Runner] | None = None) -> Job:
    """The retry of ``job`` as a job ready to insert, judged by ``settings`` (the serving executor's)."""
    return _judged(job, retry_spec(job), settings, runners)


def revision(job: Job, note: str, settings: Settings, runners: dict[str, Runner] | None = None) -> Job:
    """The follow-up that revises ``job``'s kept change as ``note`` asks."""
    note = note.strip()
    if not note:
        raise InvalidJob("say what should change: the note is the follow-up job's prompt")
    made = _judged(job, _spec(job, note), settings, runners)
    if (made.workspace_dev, made.workspace_ino) != (job.workspace_dev, job.workspace_ino):
        raise InvalidJob(f"the workspace {job.workspace} is no longer the directory job {job.id} changed; its "
                         "change cannot be revised there (reject it and submit the task again)")
    made.builds_on = job.id
    made.start_ns = job.start_ns  # the kept change is judged against the repository since it began
    if job.git:  # and lands on the HEAD it began from
        made.git = {k: job.git.get(k) for k in ("mode", "ref", "base")}
    return made


def _spec(job: Job, prompt: str) -> dict[str, Any]:
    spec = {"id": new_job_id(), "runner": job.runner, "workspace": job.workspace, "prompt": prompt,
            "session_id": job.session_id, "policy": job.policy_name, "priority": job.priority,
            "test_command": job.test_command, "skills": job.skills, "context": job.context, "follows": job.id}
    return {k: v for k, v in spec.items() if v is not None}


def _judged(job: Job, spec: dict[str, Any], settings: Settings, runners: dict[str, Runner] | None) -> Job:
    try:
        # judged here, on this host's roots: its storage is that of this host's root (read, never written)
        return job_from(validate(parse_spec(spec), settings, runners), None,
                        storage=identify(settings.workspace_roots, settings.host_id))
    except InvalidJob as exc:
        raise InvalidJob(f"a job made from {job.id} would be refused: {exc}") from None
