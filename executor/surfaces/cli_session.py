"""``executor session``: the arc of a session, the brief its next job would get, the raw history.

Owns the session command's arguments and printing; briefs are ``session/``'s.

Must never: call a model (``--context`` shows the summaries the store already holds).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..settings import Settings
    from ..store import Store
from .cli_common import job_view, load_settings, open_store


@click.command()
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--context", "context", is_flag=True,
              help="Print the brief the session's next job would get, and how each part of it was made.")
@click.option("--full", "full", is_flag=True, help="Print the raw history the brief replaces.")
@click.option("--skill", "skills", multiple=True, help="With --context: a skill the next job names (in full).")
def session(session_id: str, as_json: bool, context: bool, full: bool, skills: tuple[str, ...]) -> None:
    """The arc of a session: every job of it, in order, with its attempts and what happened."""
    from ..agent.describe import clipped

    settings = load_settings()
    store = open_store(settings)
    jobs = [j for j in store.jobs() if j.session_id == session_id]
    if not jobs:
        raise click.ClickException(f"no session {session_id!r}")
    if context or full:
        _session_context(settings, store, session_id, context, full, list(skills), as_json)
        return
    jobs.sort(key=lambda j: j.created_at)
    if as_json:
        views = []
        for j in jobs:
            events = store.events(job_id=j.id)
            views.append({**job_view(j, store.attempts(j.id), events, store.api_requests(job_id=j.id)), "events": [
                {"ts": e.ts.isoformat(), "attempt": e.attempt, "kind": e.kind, "data": e.data} for e in events]})
        click.echo(json.dumps(views, indent=2))
        return
    for job in jobs:
        click.echo(f"== job {job.id}  {job.status.value}  runner={job.runner}  attempts={job.attempts}"
                   + (f"  ({job.reason})" if job.reason else ""))
        click.echo(f"   prompt: {job.prompt[:200]}")
        for e in store.events(job_id=job.id):
            if e.kind in ("tool_call", "turn", "state", "tests", "rate_limit", "resume_unavailable", "adopted"):
                click.echo(f"   {e.ts:%H:%M:%S} a{e.attempt} {e.kind:10} {clipped(e.kind, e.data, 300)}")
        if job.changed_files:
            click.echo(f"   changed: {', '.join(job.changed_files)}")


def _session_context(settings: Settings, store: Store, session_id: str, context: bool, full: bool,
                     skills: list[str], as_json: bool) -> None:
    """``session --context`` / ``--full``: read-only. The brief uses the summaries the store already holds
    (the small model is not called); an item without one is shown as the structural line, marked so."""
    from ..session import brief as brief_mod
    from ..session import history

    earlier = history.earlier_jobs(store, None, session_id)
    out: dict[str, Any] = {"session_id": session_id, "earlier_jobs": [j.id for j in earlier]}
    if context:
        made = brief_mod.build(store, session_id, None, settings.policies / "skills", None, full_skills=skills)
        cached = brief_mod.reusable(store, session_id)
        parts = []
        for item in made.items if made else []:
            row = cached.get((item.kind, item.subject, tuple(item.event_ids)))
            if row is not None:
                item.summary = row.summary
            parts.append({"kind": item.kind, "subject": item.subject, "events": len(item.event_ids),
                          "source_size": len(item.source.encode()),
                          "made_by": (f"{row.model} (row {row.id}, job {row.job_id})" if row is not None else
                                      "structural (no summary yet: the next job's compaction writes one)"
                                      if item.prompt else "skill file description")})
        text = ""
        if made is not None:
            mode = "model" if all(p["made_by"].startswith(settings.compaction_model) or not i.prompt
                                  for p, i in zip(parts, made.items)) else "structural"
            text = brief_mod.render(made.history, made.items, settings.policies / "skills", skills,
                                    mode, None if mode == "model" else "summaries not written yet")
        last = [e.data for j in reversed(earlier) for e in store.events(job_id=j.id) if e.kind == "compaction"][:1]
        out.update({"brief": text, "brief_size": len(text.encode()), "parts": parts,
                    "last_compaction": {k: v for k, v in last[0].items() if k != "brief"} if last else None})
    if full:
        raw = brief_mod.raw_history(store, session_id, earlier)
        out.update({"history": raw, "history_size": len(raw.encode())})
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    if context:
        click.echo(out["brief"] or "(no earlier settled job and no skill: the next job starts without a brief)")
        click.echo(f"-- how it was made ({out['brief_size']} bytes):")
        for part in out["parts"]:
            click.echo(f"   {part['kind']:12} {part['subject']:32} {part['source_size']:>7} B of history -> "
                       f"{part['made_by']}")
        if out["last_compaction"]:
            lc = out["last_compaction"]
            click.echo(f"-- the last job's compaction: {lc.get('mode')}" + (f" ({lc['reason']})" if lc.get("reason") else "")
                       + (f", ${lc.get('cost_usd')}, {lc.get('latency')} s" if lc.get("cost_usd") is not None else ""))
    if full:
        click.echo(out["history"])
        click.echo(f"-- raw history: {out['history_size']} bytes")


