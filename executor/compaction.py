"""Session briefs: how a follow-up job learns what its session did before it, without the whole history.

A job whose ``session_id`` names a session that already has settled jobs is a follow-up. The policy's
``context`` (or the job's ``context: "full"``) chooses how it starts:

* ``compact`` (default): a fresh conversation; the system prompt is extended (``--append-system-prompt``)
  with the session brief built here from the session's event log:

  - files that were read but not changed: a few key points each, written by the small model (what the
    file is, what mattered about it to the task), never the content;
  - files changed: their paths, and which job changed them;
  - settled jobs: one line each ("requested X, implemented Y (files), tests: pass/fail", or why it was
    rolled back), written by the small model;
  - the test command and its last outcome;
  - skills (``policies/skills/NAME.md``): in full for the skills the job names, one line (the file's
    description) for every other skill of the session;
  - the last job's final message and the open items it named, verbatim.

* ``resume``: continue the previous job's Claude Code conversation as it is (``--resume``).
* ``full``: a fresh conversation carrying the raw history (the event log as stored) instead of a brief.

The small model is reached through the ``anthropic`` SDK (``EXECUTOR_COMPACTION_MODEL`` /
``_AUTH_ENV`` / ``_BASE_URL``) with the runners' discipline: tenacity backoff on 429/529 against the same
model, never another model, the model that answered checked and recorded. When it cannot be had, the
job starts with the *structural* brief (same sections, paths and one-liners instead of summaries) and
its record says ``compaction: structural: <why>``; with the policy's ``compaction_required`` the job
fails instead. Every item of a brief is a ``Compaction`` row beside the event ids it replaced.

Must never: put a file's content into a brief (the raw history of ``full`` excepted), fall back to
another model, or hide that a brief was made without the model.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import ExecutorError
from .policy import Policy
from .settings import Settings
from .store import Compaction, Event, Job, Status, Store

log = logging.getLogger(__name__)

WORKSPACE = "/workspace"
READ_TOOLS = frozenset({"Read"})
CHANGE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit"})
SETTLED = frozenset({Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.stalled})
SOURCE_LIMIT = 12000  # characters of history shown to the small model per item
SUMMARY_TOKENS = 300
#: A brief travels as one command-line argument (--append-system-prompt); Linux refuses one over 128 KiB.
BRIEF_LIMIT = 100_000

#: USD per million tokens (input, output), by model id prefix.
PRICES = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-haiku-3-5": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}

SYSTEM = ("You condense the history of a coding session for the agent that continues it. Be terse and "
          "factual; never quote code; no preamble.")
FILE_PROMPT = ("A file the session read but did not change: {path}\nTasks of the session that read it:\n{tasks}\n\n"
               "What the agent saw of it (clipped):\n{source}\n\nWrite 2 to 4 short bullet points: what the "
               "file is, and what mattered about it to the tasks. No code, no content.")
JOB_PROMPT = ("An earlier job of the session:\n{source}\n\nWrite ONE line of at most 40 words: 'requested X, "
              "implemented Y (files), tests: pass|fail', or, if it was not committed, why it was rolled back.")


def estimate_tokens(size: int) -> int:
    """Tokens of a request from its size in bytes (the same measure for every mode)."""
    return max(1, round(size / 4))


def cost_of(model: str, input_tokens: int, output_tokens: int) -> float | None:
    for prefix, (price_in, price_out) in PRICES.items():
        if model.startswith(prefix):
            return round((input_tokens * price_in + output_tokens * price_out) / 1e6, 6)
    return None


class CompactionUnavailable(ExecutorError):
    """The small model could not write the brief (after its retries) and the policy requires it."""

    reason = "compaction_unavailable"


# ------------------------------------------------------------------------------------------ history


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
    commands: list[tuple[str, str]]  # (command, result) of Bash calls
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
    jobs = [j for j in store.session_jobs(session_id) if j.status in SETTLED]
    if job is not None:
        jobs = [j for j in jobs if j.id != job.id and j.created_at <= job.created_at]
    return jobs


def history(store: Store, session_id: str, jobs: list[Job], extra_skills: list[str] | None = None) -> History:
    files: dict[str, FileUse] = {}
    histories = []
    skills: list[str] = []
    for job in jobs:
        events = store.events(job_id=job.id)
        calls: dict[str, tuple[str, str, int]] = {}
        changed: list[str] = []
        commands: list[tuple[str, str]] = []
        tests = None
        for e in events:
            if e.kind == "tool_call":
                name, tool_id = e.data.get("name"), e.data.get("id")
                path = rel(e.data.get("file_path")) if e.data.get("file_path") else ""
                calls[str(tool_id)] = (str(name), path or str(e.data.get("command") or ""), e.id)
                if name in READ_TOOLS and path:
                    use = files.setdefault(path, FileUse(path))
                    use.read_by.append(job.id) if job.id not in use.read_by else None
                    use.event_ids.append(e.id)
                elif name in CHANGE_TOOLS and path:
                    use = files.setdefault(path, FileUse(path))
                    use.changed_by.append(job.id) if job.id not in use.changed_by else None
                    use.event_ids.append(e.id)
                    changed.append(path) if path not in changed else None
            elif e.kind == "tool_result":
                name, subject, call_id = calls.get(str(e.data.get("tool_use_id")), ("", "", 0))
                content = str(e.data.get("content") or "")
                if name in READ_TOOLS and subject in files:
                    files[subject].event_ids.append(e.id)
                    files[subject].seen.append(content)
                elif name == "Bash":
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


# ------------------------------------------------------------------------------------------- items


@dataclass
class Item:
    """One part of the history that the brief replaces with a summary."""

    kind: str  # file | settled_job | skill
    subject: str
    event_ids: list[int]
    source: str  # the history it stands for (what the model reads)
    structural: str  # what the structural brief says
    prompt: str = ""  # the model's task ("" for skills: their one-liner is their description)
    summary: str | None = None
    row: Compaction | None = None


def _tests_word(tests: dict | None) -> str:
    if tests is None:
        return "not run"
    if tests.get("timed_out"):
        return "timed out"
    return "pass" if tests.get("exit_code") == 0 else f"fail (exit {tests.get('exit_code')})"


def _first_line(text: str | None, limit: int = 160) -> str:
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def job_line(jh: JobHistory) -> str:
    job = jh.job
    files = ", ".join(jh.changed) or "no files"
    line = f"requested: {_first_line(job.prompt)}; changed {files}; tests: {_tests_word(jh.tests)}"
    if job.status != Status.succeeded:
        line += f"; {job.status.value}: {job.reason or ''} {_first_line(job.error)}".rstrip()
    return line


def _job_source(jh: JobHistory) -> str:
    job = jh.job
    parts = [f"job {job.id}, status {job.status.value}" + (f" ({job.reason}: {job.error})" if job.reason else ""),
             f"request: {job.prompt}", f"files it changed: {', '.join(jh.changed) or 'none'}"]
    for command, result in jh.commands:
        parts.append(f"ran: {command}\n{result[-800:]}")
    if jh.tests is not None:
        parts.append(f"test gate: {jh.tests.get('command')} -> {_tests_word(jh.tests)}\n"
                     f"{str(jh.tests.get('output_tail') or '')[-600:]}")
    if job.final_text:
        parts.append(f"its final message: {job.final_text}")
    return "\n".join(parts)[:SOURCE_LIMIT]


def items_of(h: History, skills_dir: Path, full_skills: list[str]) -> list[Item]:
    items: list[Item] = []
    prompts = {jh.job.id: jh.job.prompt for jh in h.jobs}
    for use in h.read_only:
        source = "\n---\n".join(use.seen)[:SOURCE_LIMIT]
        tasks = "\n".join(f"- {_first_line(prompts.get(j), 300)}" for j in use.read_by)
        items.append(Item("file", use.path, sorted(set(use.event_ids)), source,
                          f"read by {', '.join(use.read_by)}",
                          FILE_PROMPT.format(path=use.path, tasks=tasks, source=source)))
    for jh in h.jobs:
        source = _job_source(jh)
        items.append(Item("settled_job", jh.job.id, [e.id for e in jh.events if e.id is not None], source,
                          job_line(jh), JOB_PROMPT.format(source=source)))
    for name in h.skills:
        if name in full_skills:
            continue
        text = skill_text(skills_dir, name)
        items.append(Item("skill", name, [], text, skill_description(text, name)))
    return items


# ----------------------------------------------------------------------------------------- the model


@dataclass
class Answer:
    text: str
    model: str
    input_tokens: int
    output_tokens: int
    latency: float


def _retryable(exc: BaseException) -> bool:
    import anthropic

    if isinstance(exc, (anthropic.RateLimitError, anthropic.OverloadedError)):
        return True
    return isinstance(exc, anthropic.APIStatusError) and exc.status_code in (429, 529)


class Summarizer:
    """The small model, through the anthropic SDK, with tenacity backoff on 429/529 (same model)."""

    def __init__(self, model: str, api_key: str, base_url: str | None = None, attempts: int = 4,
                 backoff: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> None:
        import anthropic

        self.model = model
        self.attempts = attempts
        self.backoff = backoff
        self.sleep = sleep
        # The SDK's own retries are off: the backoff below is the one in control, and it is recorded.
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=120.0)

    @classmethod
    def from_settings(cls, settings: Settings, secrets: Mapping[str, str]) -> Summarizer:
        key = secrets.get(settings.compaction_auth_env)
        if not key:
            raise CompactionUnavailable(
                f"the small model's key is missing: {settings.compaction_auth_env} "
                "(EXECUTOR_COMPACTION_AUTH_ENV) is not set in the executor's environment")
        return cls(settings.compaction_model, key, settings.compaction_base_url,
                   attempts=settings.compaction_attempts, backoff=settings.compaction_backoff)

    def __call__(self, prompt: str) -> Answer:
        started = time.monotonic()
        retrying = Retrying(retry=retry_if_exception(_retryable), stop=stop_after_attempt(self.attempts),
                            wait=wait_exponential(multiplier=self.backoff, max=60), sleep=self.sleep, reraise=True)
        response = retrying(self.client.messages.create, model=self.model, max_tokens=SUMMARY_TOKENS,
                            system=SYSTEM, messages=[{"role": "user", "content": prompt}])
        if response.model != self.model:
            raise CompactionUnavailable(f"model {response.model!r} answered instead of {self.model!r} "
                                        "(no fallback to another model)")
        text = "".join(getattr(b, "text", "") for b in response.content).strip()
        if not text:
            raise CompactionUnavailable(f"{self.model} returned an empty summary")
        return Answer(text, response.model, response.usage.input_tokens, response.usage.output_tokens,
                      time.monotonic() - started)


def _why(exc: BaseException, summarizer: Summarizer | None) -> str:
    import anthropic

    if isinstance(exc, CompactionUnavailable):
        return str(exc)
    if isinstance(exc, anthropic.APIStatusError):
        after = f" after {summarizer.attempts} attempts" if summarizer and _retryable(exc) else ""
        return f"{getattr(summarizer, 'model', 'the small model')} answered {exc.status_code}{after}: {exc.message}"[:500]
    return f"{getattr(summarizer, 'model', 'the small model')} could not be reached: {type(exc).__name__}: {exc}"[:500]


# ------------------------------------------------------------------------------------------- briefs


@dataclass
class Brief:
    text: str
    mode: str  # model | structural | full
    reason: str | None
    items: list[Item]
    history: History

    @property
    def rows(self) -> list[Compaction]:
        return [i.row for i in self.items if i.row is not None]

    @property
    def cost_usd(self) -> float:
        return round(sum(r.cost_usd or 0.0 for r in self.rows), 6)

    @property
    def latency(self) -> float:
        return round(max((r.latency or 0.0 for r in self.rows), default=0.0), 3)


def _reusable(store: Store, session_id: str, model: str) -> dict[tuple, Compaction]:
    """Summaries already written in this session, by (kind, subject, event ids): no second call."""
    found = {}
    for row in store.compactions(session_id=session_id):
        if row.model == model and row.summary:
            found[(row.kind, row.subject, tuple(row.event_ids or []))] = row
    return found


def summarize(items: list[Item], summarizer: Summarizer | None, reuse: dict[tuple, Compaction],
              session_id: str, job_id: str, workers: int = 4) -> str | None:
    """Fill every item's summary and row; the reason when the model could not be had (then every
    summary is dropped: the brief is structural as a whole)."""
    todo = []
    for item in items:
        if not item.prompt:
            continue
        cached = reuse.get((item.kind, item.subject, tuple(item.event_ids)))
        if cached is not None:
            item.summary = cached.summary
            item.row = Compaction(session_id=session_id, job_id=job_id, kind=item.kind, subject=item.subject,
                                  event_ids=item.event_ids, source_size=_size(item.source),
                                  summary_size=_size(cached.summary), summary=cached.summary, model=cached.model,
                                  input_tokens=0, output_tokens=0, cost_usd=0.0, latency=0.0,
                                  reused_from=cached.reused_from or cached.id)
        else:
            todo.append(item)
    reason = None
    if todo and summarizer is None:
        reason = "no small model configured"
    elif todo:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            futures = [(item, pool.submit(summarizer, item.prompt)) for item in todo]
            for item, future in futures:
                try:
                    answer = future.result()
                except Exception as exc:  # noqa: BLE001 - any failure of the small model is reported
                    reason = reason or _why(exc, summarizer)
                    continue
                item.summary = answer.text
                item.row = Compaction(session_id=session_id, job_id=job_id, kind=item.kind, subject=item.subject,
                                      event_ids=item.event_ids, source_size=_size(item.source),
                                      summary_size=_size(answer.text), summary=answer.text, model=answer.model,
                                      input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                                      cost_usd=cost_of(answer.model, answer.input_tokens, answer.output_tokens),
                                      latency=round(answer.latency, 3))
    if reason is not None:
        for item in items:
            item.summary = None
            item.row = None
    for item in items:
        if item.row is None:
            text = item.structural
            item.row = Compaction(session_id=session_id, job_id=job_id, kind=item.kind, subject=item.subject,
                                  event_ids=item.event_ids, source_size=_size(item.source),
                                  summary_size=_size(text), summary=text, model=None)
    return reason


def _size(text: str | None) -> int:
    return len((text or "").encode("utf-8"))


def build(store: Store, session_id: str, job: Job | None, skills_dir: Path, summarizer: Summarizer | None,
          full_skills: list[str] | None = None, reuse: bool = True) -> Brief | None:
    """The brief for ``job`` (or the next job when None); None when there is nothing to say."""
    jobs = earlier_jobs(store, job, session_id)
    full_skills = list(full_skills if full_skills is not None else (job.skills or [] if job else []))
    h = history(store, session_id, jobs, full_skills)
    if not jobs and not full_skills:
        return None
    items = items_of(h, skills_dir, full_skills)
    model = summarizer.model if summarizer else None
    cache = _reusable(store, session_id, model) if reuse and model else {}
    reason = summarize(items, summarizer, cache, session_id, job.id if job else "")
    needs_model = any(i.prompt for i in items)
    mode = ("model" if reason is None else "structural") if needs_model else "static"
    if not needs_model:
        reason = None  # skills only: nothing to summarize
    return Brief(render(h, items, skills_dir, full_skills, mode, reason), mode, reason, items, h)


def render(h: History, items: list[Item], skills_dir: Path, full_skills: list[str], mode: str,
           reason: str | None) -> str:
    by = {(i.kind, i.subject): i for i in items}
    out: list[str] = []
    if h.jobs:
        how = "summaries by the small model" if mode == "model" else f"structural, without model summaries ({reason})"
        out += [f"# Session brief: session {h.session_id}, {len(h.jobs)} earlier job(s)",
                "This job continues a session. Instead of the earlier conversation you get this brief "
                f"({how}). The repository already holds every committed change; read a file again before "
                "relying on details of it.", ""]
        changed = h.changed
        out.append("## Files changed in this session")
        for path in changed:
            who = [f"{j} ({_status_of(h, j)})" for j in h.files[path].changed_by]
            out.append(f"- {path}: changed by {', '.join(who)}")
        if not changed:
            out.append("- none")
        out += ["", "## Files read but not changed"]
        for use in h.read_only:
            item = by.get(("file", use.path))
            if item and item.summary:
                out.append(f"- {use.path} (read by {', '.join(use.read_by)}):")
                out += [f"  {line.strip()}" for line in item.summary.splitlines() if line.strip()]
            else:
                out.append(f"- {use.path} ({item.structural if item else ''})")
        if not h.read_only:
            out.append("- none")
        out += ["", "## Earlier jobs (oldest first)"]
        for jh in h.jobs:
            item = by.get(("settled_job", jh.job.id))
            line = " ".join((item.summary or item.structural).split()) if item else job_line(jh)
            out.append(f"- {jh.job.id} [{jh.job.status.value}]: {line}")
        out += ["", "## Tests"]
        found = h.last_tests
        if found:
            jh, tests = found
            tail = _last_line(tests.get("output_tail"))
            out.append(f"- command: `{tests.get('command')}`")
            out.append(f"- last outcome (job {jh.job.id}): {_tests_word(tests)}" + (f": {tail}" if tail else ""))
        else:
            out.append(f"- command: `{h.test_command or 'none'}`; not run yet")
        out.append("")
    if h.skills:
        out.append("## Skills")
        for name in h.skills:
            if name in full_skills:
                out += [f"### Skill {name} (in full)", skill_text(skills_dir, name).strip(), ""]
        others = [n for n in h.skills if n not in full_skills]
        if others:
            out.append("Other skills of this session (not loaded for this job):")
            for name in others:
                item = by.get(("skill", name))
                line = item.structural if item else skill_description(skill_text(skills_dir, name), name)
                out.append(f"- {name}: {line}")
        out.append("")
    last = h.last
    if last is not None:
        out += [f"## The last job's final message ({last.job.id}, verbatim)", (last.job.final_text or "(none)").strip(), ""]
        items = open_items(last.job.final_text)
        out.append("## Open items it named (verbatim)")
        out += [f"- {line.strip()}" for line in items] if items else ["- none"]
    return "\n".join(out).strip() + "\n"


def _status_of(h: History, job_id: str) -> str:
    for jh in h.jobs:
        if jh.job.id == job_id:
            return "committed" if jh.job.status == Status.succeeded else jh.job.status.value.replace("_", " ")
    return "?"


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def raw_history(store: Store, session_id: str, jobs: list[Job]) -> str:
    """The history a brief replaces, as stored: every job's prompt and events (``full`` and ``--full``)."""
    out = [f"# Session history: session {session_id}, {len(jobs)} earlier job(s), raw event log"]
    for job in jobs:
        out += ["", f"## Job {job.id} [{job.status.value}]" + (f" ({job.reason}: {job.error})" if job.reason else ""),
                f"Request: {job.prompt}"]
        for e in store.events(job_id=job.id):
            if e.kind in ("tool_call", "tool_result", "turn", "tests", "result"):
                out.append(f"[{e.id} {e.kind}] {json.dumps(e.data, ensure_ascii=False, default=str)}")
        if job.final_text:
            out.append(f"Final message: {job.final_text}")
    return "\n".join(out) + "\n"


def retention_problems(brief: str, h: History) -> list[str]:
    """What a brief forgot of its history: changed and read files, the test command and its last
    outcome, the skills in use, the last job's open items (an empty list: nothing)."""
    problems = []
    for path in h.files:
        if path not in brief:
            problems.append(f"file {path} is not named")
    command = h.test_command
    if command and command not in brief:
        problems.append(f"the test command {command!r} is not named")
    found = h.last_tests
    if found and f"last outcome (job {found[0].job.id}): {_tests_word(found[1])}" not in brief:
        problems.append("the last test outcome is not given")
    for name in h.skills:
        if name not in brief:
            problems.append(f"skill {name} is not named")
    if h.last is not None:
        for line in open_items(h.last.job.final_text):
            if line.strip() not in brief:
                problems.append(f"open item {line.strip()!r} is missing")
    return problems


# --------------------------------------------------------------------------------------- job start


@dataclass
class Start:
    """How a job's conversation starts: a Claude Code session to continue and/or a brief to append."""

    resume: str | None = None
    brief: str | None = None  # appended to the system prompt
    #: put before the prompt: a resumed conversation keeps the system prompt it started with (Claude Code
    #: 2.1.328 does not apply a new --append-system-prompt to it), so what must reach it goes in the prompt
    prompt_note: str | None = None


def mode_of(job: Job, policy: Policy) -> str:
    return "full" if job.context == "full" else policy.context


def start(store: Store, settings: Settings, secrets: Mapping[str, str], job: Job, policy: Policy, attempt: int,
          transcript_ok: Callable[[str], bool], resuming: bool = False,
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
        previous = next((a.claude_session_id for a in reversed(store.attempts(jobs[-1].id)) if a.claude_session_id), None)
        if previous and transcript_ok(previous):
            # The conversation goes on as it is; the skills the job names still ride along in full, in the
            # prompt (a resumed conversation keeps the system prompt it was started with).
            text = _skills_only(store, job, jobs, skills_dir) if job.skills else None
            _record(store, job, attempt, {"mode": "resume", "claude_session_id": previous, "previous_job": jobs[-1].id,
                                          **({"prompt_note": text, "brief_size": _size(text)} if text else {})})
            return Start(resume=previous, prompt_note=text)
        store.add_event(job, attempt, "resume_unavailable", {
            "claude_session_id": previous, "why": "the previous job's transcript cannot be read: starting with "
                                                  "the compacted brief instead"})
        mode = "compact"
    if jobs and mode == "full":
        text = raw_history(store, job.session_id, jobs)
        if _size(text) > BRIEF_LIMIT - 5000:  # keep the most recent history, and say so
            tail = text.encode()[-(BRIEF_LIMIT - 5000):].decode("utf-8", "ignore")
            text = (f"[the raw history is {_size(text)} bytes; only its last {BRIEF_LIMIT - 5000} bytes fit "
                    f"the system prompt; `executor session {job.session_id} --full` prints all of it]\n{tail}")
        if job.skills:
            text += "\n" + _skills_only(store, job, jobs, skills_dir)
        _record(store, job, attempt, {"mode": "full", "brief": text, "brief_size": _size(text)})
        return Start(brief=text)
    reason = None
    if summarizer is None and jobs:
        try:
            summarizer = Summarizer.from_settings(settings, secrets)
        except CompactionUnavailable as exc:
            reason = str(exc)
    brief = build(store, job.session_id, job, skills_dir, summarizer)
    if brief is None:
        return Start()
    if reason is not None and brief.mode == "structural":
        brief.reason = reason
        brief.text = render(brief.history, brief.items, skills_dir, job.skills or [], "structural", reason)
    if _size(brief.text) > BRIEF_LIMIT:
        brief.text = (brief.text.encode()[:BRIEF_LIMIT - 200].decode("utf-8", "ignore")
                      + "\n[brief cut at the command line's limit: skills in full are the likely cause]\n")
    if brief.mode == "structural" and policy.compaction_required:
        _record(store, job, attempt, {"mode": "failed", "reason": brief.reason})
        raise CompactionUnavailable(f"the session brief could not be written by the small model "
                                    f"(compaction_required): {brief.reason}")
    store.add_compactions(brief.rows)
    models = sorted({r.model for r in brief.rows if r.model})
    _record(store, job, attempt, {
        "mode": brief.mode, "reason": brief.reason, "brief": brief.text, "brief_size": _size(brief.text),
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
