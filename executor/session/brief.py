"""The session brief: the items it is made of, their summaries, and its text.

Owns turning a ``History`` into items (files read, earlier jobs, skills), filling their summaries through
the small model (or reusing one already written for the same events), rendering the brief, the raw
history it replaces, and the check of what a brief forgot (``retention_problems``).

Must never: put a file's content into a brief (the raw history excepted), or hide that a brief was made
without the model.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..store import Compaction, Job, Status, Store
from .history import (
    History,
    JobHistory,
    earlier_jobs,
    history,
    open_items,
    skill_description,
    skill_text,
)
from .summarizer import Summarizer, why_unavailable

SOURCE_LIMIT = 12000  # characters of history shown to the small model per item
FILE_PROMPT = ("A file the session read but did not change: {path}\nTasks of the session that read it:\n{tasks}\n\n"
               "What the agent saw of it (clipped):\n{source}\n\nWrite 2 to 4 short bullet points: what the "
               "file is, and what mattered about it to the tasks. No code, no content.")
JOB_PROMPT = ("An earlier job of the session:\n{source}\n\nWrite ONE line of at most 40 words: 'requested X, "
              "implemented Y (files), tests: pass|fail', or, if it was not committed, why it was rolled back.")


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


def reusable(store: Store, session_id: str, model: str | None = None) -> dict[tuple, Compaction]:
    """Summaries a model already wrote in this session (by ``model``, or by any model when None), by
    (kind, subject, event ids): the same events are never summarized twice."""
    found = {}
    for row in store.compactions(session_id=session_id):
        if row.summary and row.model and (model is None or row.model == model):
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
                                  event_ids=item.event_ids, source_size=size(item.source),
                                  summary_size=size(cached.summary), summary=cached.summary, model=cached.model,
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
                    reason = reason or why_unavailable(exc, summarizer)
                    continue
                item.summary = answer.text
                item.row = Compaction(session_id=session_id, job_id=job_id, kind=item.kind, subject=item.subject,
                                      event_ids=item.event_ids, source_size=size(item.source),
                                      summary_size=size(answer.text), summary=answer.text, model=answer.model,
                                      input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                                      cost_usd=summarizer.cost(answer.model, answer.input_tokens, answer.output_tokens),
                                      latency=round(answer.latency, 3))
    if reason is not None:
        for item in items:
            item.summary = None
            item.row = None
    for item in items:
        if item.row is None:
            text = item.structural
            item.row = Compaction(session_id=session_id, job_id=job_id, kind=item.kind, subject=item.subject,
                                  event_ids=item.event_ids, source_size=size(item.source),
                                  summary_size=size(text), summary=text, model=None)
    return reason


def size(text: str | None) -> int:
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
    cache = reusable(store, session_id, model) if reuse and model else {}
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


