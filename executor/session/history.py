"""A session's history as the brief needs it: its settled jobs, the files they read and changed, the tests,
the skills, the open items the last job named.

Owns reading the session's event log into a ``History`` and the skill files' texts and one-line
descriptions.

Must never: write to the store, or call a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..agent.registry import agent_named
from ..store import TERMINAL, Event, Job, Store

WORKSPACE = "/workspace"


def rel(path: str | None) -> str:
    """A path as the repository knows it (the agent sees the repository at /workspace)."""
    path = str(path or "")
    if path == WORKSPACE:
        return "."
    return path[len(WORKSPACE) + 1:] if path.startswith(WORKSPACE + "/") else path


@dataclass
class FileUse:
    path: str
    read_by: list[str] = field(default_factory=list)
    changed_by: list[str] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # tool results of its reads


@dataclass
class JobHistory:
    job: Job
    events: list[Event]
    changed: list[str]  # attempted changes (tool calls) and committed files
    commands: list[tuple[str, str]]  # (command, result) of shell commands
    tests: dict | None  # the last test gate event's data


@dataclass
class History:
    """What a session's event log says, for the jobs before a given one."""

    session_id: str
    jobs: list[JobHistory]
    files: dict[str, FileUse]
    skills: list[str]  # every skill named in the session, in order of first use

    @property
    def changed(self) -> list[str]:
        return [f.path for f in self.files.values() if f.changed_by]

    @property
    def read_only(self) -> list[FileUse]:
        return [f for f in self.files.values() if f.read_by and not f.changed_by]

    @property
    def last(self) -> JobHistory | None:
        return self.jobs[-1] if self.jobs else None

    @property
    def last_tests(self) -> tuple[JobHistory, dict] | None:
        for jh in reversed(self.jobs):
            if jh.tests is not None:
                return jh, jh.tests
        return None

    @property
    def test_command(self) -> str | None:
        found = self.last_tests
        if found:
            return found[1].get("command")
        return next((jh.job.test_command for jh in reversed(self.jobs) if jh.job.test_command), None)


def earlier_jobs(store: Store, job: Job | None, session_id: str) -> list[Job]:
    """The settled jobs of the session that came before ``job`` (all settled ones when job is None)."""
    jobs = [j for j in store.session_jobs(session_id) if j.status in TERMINAL]
    if job is not None:
        jobs = [j for j in jobs if j.id != job.id and j.created_at <= job.created_at]
    return jobs


def history(store: Store, session_id: str, jobs: list[Job], extra_skills: list[str] | None = None) -> History:
    files: dict[str, FileUse] = {}
    histories = []
    skills: list[str] = []
    for job in jobs:
        events = store.events(job_id=job.id)
        action = agent_named(job.agent).tool_action  # what a tool does is its agent's knowledge
        calls: dict[str, tuple[str, str, int]] = {}
        changed: list[str] = []
        commands: list[tuple[str, str]] = []
        tests = None
        for e in events:
            if e.kind == "tool_call":
                name, tool_id = action(str(e.data.get("name"))), e.data.get("id")
                path = rel(e.data.get("file_path")) if e.data.get("file_path") else ""
                calls[str(tool_id)] = (str(name), path or str(e.data.get("command") or ""), e.id)
                if name == "read" and path:
                    use = files.setdefault(path, FileUse(path))
                    use.read_by.append(job.id) if job.id not in use.read_by else None
                    use.event_ids.append(e.id)
                elif name == "edit" and path:
                    use = files.setdefault(path, FileUse(path))
                    use.changed_by.append(job.id) if job.id not in use.changed_by else None
                    use.event_ids.append(e.id)
                    changed.append(path) if path not in changed else None
            elif e.kind == "tool_result":
                name, subject, call_id = calls.get(str(e.data.get("tool_use_id")), ("", "", 0))
                content = str(e.data.get("content") or "")
                if name == "read" and subject in files:
                    files[subject].event_ids.append(e.id)
                    files[subject].seen.append(content)
                elif name == "shell":
                    commands.append((subject, content))
            elif e.kind == "tests":
                tests = e.data
        for path in job.changed_files or []:
            use = files.setdefault(path, FileUse(path))
            use.changed_by.append(job.id) if job.id not in use.changed_by else None
            changed.append(path) if path not in changed else None
        for name in job.skills or []:
            skills.append(name) if name not in skills else None
        histories.append(JobHistory(job, events, changed, commands, tests))
    for name in extra_skills or []:
        skills.append(name) if name not in skills else None
    return History(session_id, histories, files, skills)


_OPEN_RE = re.compile(r"\b(todo|fixme|open items?|open questions?|follow[- ]?ups?|not yet|still (?:need|to|open)|"
                      r"left to do|remaining|next steps?|unresolved|pending|later)\b", re.I)
_BULLET_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def open_items(text: str | None) -> list[str]:
    """Lines of a final message that name open items, verbatim (a heading's bullets come along)."""
    items: list[str] = []
    under_heading = False
    for line in (text or "").splitlines():
        stripped = line.rstrip()
        if not stripped.strip():
            under_heading = False
            continue
        if _OPEN_RE.search(stripped):
            items.append(stripped)
            under_heading = stripped.endswith(":")
        elif under_heading and _BULLET_RE.match(stripped):
            items.append(stripped)
    return items


# ------------------------------------------------------------------------------------------- skills


def skill_path(skills_dir: Path, name: str) -> Path:
    return skills_dir / f"{name}.md"


def skill_text(skills_dir: Path, name: str) -> str:
    try:
        return skill_path(skills_dir, name).read_text(encoding="utf-8")
    except OSError:
        return ""


def skill_description(text: str, name: str) -> str:
    """The one-line description of a skill: its front matter's ``description``, else its first line."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        for line in lines[1:]:
            if line.strip() == "---":
                break
            if line.lower().startswith("description:"):
                return line.split(":", 1)[1].strip()
    for line in lines:
        line = line.strip().lstrip("#").strip()
        if line and line != "---":
            return line[:200]
    return f"skill {name}"


