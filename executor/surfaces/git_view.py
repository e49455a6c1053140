"""What people see of where a job's change landed in git (policy ``land``): the commit on the branch it
started on, or its own branch ``executor/<id>`` and how to land it, or that it was landed later.

Owns the shape ``executor show --json`` prints under ``git`` and the one line ``show``, the review page and
the notifications say about it, so the three name the branch in the same words.

Must never: write to the store, or read anything but the job's own record.
"""

from __future__ import annotations

from typing import Any

SHORT = 12  # characters of a commit id in a sentence


def git_view(record: dict | None, job_id: str) -> dict[str, Any] | None:
    """The job's ``git`` record as ``show --json`` prints it (None: the change lands as files)."""
    if not record:
        return None
    started = (record.get("ref") or "").removeprefix("refs/heads/") or None
    return {"land": record.get("mode"), "started_on": started, "base": record.get("base"),
            "branch": record.get("branch"), "commit": record.get("commit"), "parent": record.get("parent"),
            "note": record.get("note"), "landed": record.get("landed"),
            "land_command": f"executor land {job_id}" if _landable(record) else None}


def git_line(record: dict | None, job_id: str) -> str | None:
    """One sentence: where the change is in git (None: it lands as files, or it has not landed yet and
    nothing is worth saying)."""
    if not record:
        return None
    mode, commit, branch = record.get("mode"), record.get("commit"), record.get("branch")
    landed = record.get("landed")
    if landed:
        return (f"branch {branch} (commit {_short(commit)}), landed as commit {_short(landed.get('commit'))} on "
                f"{landed.get('branch')}" if landed.get("commit") else f"branch {branch}, landed: {landed.get('note')}")
    if not branch:
        started = (record.get("ref") or "").removeprefix("refs/heads/") or "a detached HEAD"
        base = f" at {_short(record.get('base'))}" if record.get("base") else " (no commit yet)"
        return f"land = {mode}, started on {started}{base}"
    if not commit:
        return f"land = {mode}: {record.get('note') or 'nothing to commit'}"
    if mode == "branch":
        return f"branch {branch} (commit {_short(commit)}); `executor land {job_id}` brings it into the working tree"
    return f"commit {_short(commit)} on {branch}"


def _landable(record: dict) -> bool:
    return record.get("mode") == "branch" and bool(record.get("commit")) and not record.get("landed")


def _short(commit: str | None) -> str:
    return (commit or "?")[:SHORT]
