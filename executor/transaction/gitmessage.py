"""The commit message and the identity a job's change lands in git with.

Owns the words: the agent's summary as the subject (its final message's first line, 72 characters at
most), the prompt as the body, and the trailers that say where the change came from and what proved it
(``Executor-Job``, ``Executor-Runner``, ``Executor-Model``: the model that answered, ``Executor-Session``,
``Executor-Tests``: the gate's verdict, and ``Executor-Reviewed-By`` when a person approved it). Author and
committer are ``EXECUTOR_GIT_AUTHOR`` (read by ``settings.parse_author``).

Must never: put a line break into a trailer's value, or let the prompt's size make the message unbounded.
"""

from __future__ import annotations

import re

from ..settings import parse_author
from ..store import Job

__all__ = ["message", "parse_author", "subject", "tests_line"]

SUBJECT = 72
BODY_LIMIT = 16 * 1024  # the prompt in the body; a longer one is cut (the job's record keeps it whole)
TRAILER_LIMIT = 200
_MARKUP = re.compile(r"^[\s#>*\-+`]+")


def subject(final_text: str | None, job_id: str) -> str:
    """The first line of the agent's final message that says something, without markup, at most 72
    characters (cut at a word, marked with an ellipsis)."""
    for line in (final_text or "").splitlines():
        text = " ".join(_MARKUP.sub("", line).split())
        if text and not text.upper().startswith("REVIEW:"):
            break
    else:
        text = f"executor job {job_id}"
    if len(text) <= SUBJECT:
        return text
    cut = text[: SUBJECT - 1]
    if " " in cut[SUBJECT // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:") + "…"


def tests_line(job: Job) -> str:
    """The gate's verdict in a line: ``12 passed; proves test_add`` for the graded gate, the command's exit
    for the exit-code gate."""
    record = job.evaluation or {}
    if record.get("kind") or record.get("verdict"):
        parts = []
        if record.get("passed") is not None:
            parts.append(f"{record['passed']} passed")
        proved = record.get("fail_to_pass") or []
        if proved:
            more = f" and {len(proved) - 3} more" if len(proved) > 3 else ""
            parts.append("proves " + ", ".join(proved[:3]) + more)
        elif record.get("kind") == "tests" and record.get("coverage"):
            parts.append(f"covers {record['coverage'].get('lines')} more lines")
        elif record.get("kind") == "code":
            parts.append("no test of its own")
        if record.get("verdict") not in (None, "passed"):
            parts.append(f"{record['verdict']} (approved in review)")
        return "; ".join(parts) or str(record.get("verdict"))
    if job.test_exit_code is None:
        return "not run"
    return f"{job.test_command or 'true'} exited {job.test_exit_code}"


def message(job: Job) -> str:
    """The whole commit message of ``job``'s change."""
    prompt = job.prompt.strip()
    if len(prompt) > BODY_LIMIT:
        prompt = prompt[:BODY_LIMIT].rstrip() + f"\n\n[the prompt goes on: {len(job.prompt)} characters in all]"
    trailers = [("Executor-Job", job.id), ("Executor-Runner", job.runner),
                ("Executor-Model", ", ".join(job.models_seen or []) or job.model_requested),
                ("Executor-Session", job.session_id), ("Executor-Tests", tests_line(job))]
    if job.reviewed_by:
        trailers.append(("Executor-Reviewed-By", job.reviewed_by))
    lines = "".join(f"{key}: {_one_line(value)}\n" for key, value in trailers)
    return f"{subject(job.final_text, job.id)}\n\n{prompt}\n\n{lines}"


def _one_line(value: str) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= TRAILER_LIMIT else text[: TRAILER_LIMIT - 1] + "…"
