"""What the page's templates show, made from the executor's records: diffs coloured by language, the diff a
person decided on, event rows (the stream's raw rows marked to be collapsed), and the words for a job's
situation (why it waits, how a review ended).

Must never: put text from a job into HTML unescaped (Pygments escapes what it colours, ``html.escape`` the
rest), or read anything but what it is given.
"""

from __future__ import annotations

import html
from typing import Any

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound

from ...agent.describe import describe
from ...review import FileDiff
from ...store import Job

_FORMATTER = HtmlFormatter(nowrap=True)
PYGMENTS_CSS = HtmlFormatter(style="default").get_style_defs(".code")
#: Event kinds that are the stream's raw rows (messages the parser keeps but nobody reads): collapsed.
RAW_KINDS = frozenset({"other", "thinking"})
#: How much of one event a row shows.
ROW_TEXT = 600


def _lexer(path: str):
    try:
        return get_lexer_for_filename(path, stripnl=False, stripall=False, ensurenl=False)
    except ClassNotFound:
        return TextLexer(stripnl=False, ensurenl=False)


def _highlight_lines(path: str, text: str | None) -> list[str]:
    """One HTML string per line of ``text``, coloured as the file's language (escaped plain text if not)."""
    if not text:
        return []
    lines = text.splitlines()
    if len(text) > 512 * 1024:
        return [html.escape(line) for line in lines]
    lexer = _lexer(path)
    if text.split("\n")[:len(lines)] == [line.rstrip("\r") for line in lines] and "\r" not in text:
        out = highlight(text, lexer, _FORMATTER).split("\n")
        if len(out) >= len(lines):
            return out[:len(lines)]
    return [highlight(line, lexer, _FORMATTER).rstrip("\n") for line in lines]


def diff_view(diff: FileDiff) -> dict[str, Any]:
    """A file's diff ready for the template: hunks whose lines carry coloured HTML (the whole file is
    coloured, so a line inside a docstring is coloured as one)."""
    old = _highlight_lines(diff.path, diff.old)
    new = _highlight_lines(diff.path, diff.new)
    hunks = []
    for hunk in diff.hunks():
        rows = []
        for tag, old_no, new_no, text in hunk["lines"]:
            source = new if tag == "+" else old
            number = new_no if tag == "+" else old_no
            code = source[number - 1] if number is not None and number - 1 < len(source) else html.escape(text)
            rows.append({"tag": tag, "old": old_no, "new": new_no, "html": code})
        hunks.append({"header": hunk["header"], "rows": rows})
    return {"path": diff.path, "kind": diff.kind, "note": diff.note, "added": diff.added,
            "removed": diff.removed, "removed_paths": diff.removed_paths, "more_removed": 0, "hunks": hunks}


def kept_view(entry: dict[str, Any], applied: list[str] | None) -> dict[str, Any]:
    """A file of a decided review's kept diff (``review/kept.py``), coloured line by line; ``applied``: the
    paths a partial approval applied (None: all or none, as the decision says)."""
    lexer = _lexer(str(entry.get("path", "")))
    hunks = []
    for hunk in entry.get("hunks") or []:
        rows = [{"tag": tag, "old": old_no, "new": new_no,
                 "html": highlight(str(text), lexer, _FORMATTER).rstrip("\n")}
                for tag, old_no, new_no, text in hunk["lines"]]
        hunks.append({"header": hunk["header"], "rows": rows})
    path = str(entry.get("path", ""))
    skipped = applied is not None and not any(path == p or path.startswith(p.rstrip("/") + "/") for p in applied)
    note = str(entry.get("note", "")) + ("; not applied (not chosen)" if skipped else "")
    if entry.get("clipped"):
        note += "; its lines were not kept (the diff was too large)"
    return {"path": path, "kind": entry.get("kind"), "note": note, "added": entry.get("added", 0),
            "removed": entry.get("removed", 0), "removed_paths": entry.get("removed_paths") or [],
            "more_removed": entry.get("more_removed", 0), "hunks": hunks}


def event_row(event) -> dict[str, Any]:
    """One row of the event log (the page's and the live stream's: the same fields)."""
    return {"id": event.id, "time": event.ts.strftime("%H:%M:%S"), "attempt": event.attempt, "kind": event.kind,
            "text": describe(event.kind, event.data)[:ROW_TEXT], "raw": event.kind in RAW_KINDS}


def decision(job: Job) -> dict[str, str] | None:
    """How a person's review of the job ended, as a banner: its class (approved, rejected, sent back or
    failed) and its words. None when no person decided."""
    if not job.reviewed_at:
        return None
    who = f"by {job.reviewed_by}" + (f": “{job.review_note}”" if job.review_note else "")
    if job.reason == "changes_requested":
        return {"kind": "sent-back", "text": f"Changes requested {who}."}
    if job.reason == "rejected":
        return {"kind": "rejected", "text": f"Rejected {who}. The change was discarded; the repository was not "
                                            "touched."}
    if job.status.value == "succeeded":
        part = f" ({len(job.review_files)} chosen paths)" if job.review_files else ""
        record = job.git or {}
        where = (f"on the branch {record['branch']}; the working tree was not touched"
                 if record.get("mode") == "branch" and record.get("branch") else "in the repository")
        return {"kind": "approved", "text": f"Approved{part} {who}. The change is {where}."}
    if job.status.value in ("committing", "awaiting_review"):
        return None
    return {"kind": "failed", "text": f"Approved {who}, but not applied: {job.error or job.reason}"}
