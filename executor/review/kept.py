"""The diff a person decided on, kept after the decision: what was approved, rejected or sent back.

Owns ``$EXECUTOR_HOME/reviews/<job>.json``: written by the executor (never by a job) just before a review
decision, from the diff the reviewer was shown; read by the page and ``review show`` once the change itself
is applied or gone. Each file keeps hunks with their line numbers, not whole files, and at most ``LIMIT``
bytes: past that, files keep their summary line without their hunks.

Must never: be written from anything but a ``FileDiff`` the executor computed, or be read as anything but
data (the page escapes every line it shows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..settings import Settings
from .diff import FileDiff

#: Bytes a kept diff may take; the rest of its files keep only their summary line.
LIMIT = 4 * 2**20
#: Paths listed below a deleted or replaced directory.
MAX_REMOVED_PATHS = 200


def path_of(settings: Settings, job_id: str) -> Path:
    return settings.reviews_dir / f"{job_id}.json"


def keep(settings: Settings, job_id: str, diffs: list[FileDiff]) -> None:
    """Write the job's diff as the reviewer saw it (atomically: a reader sees the old file or the new)."""
    files, size = [], 0
    for d in diffs:
        entry: dict[str, Any] = {"path": d.path, "kind": d.kind, "note": d.note, "added": d.added,
                                 "removed": d.removed, "removed_paths": d.removed_paths[:MAX_REMOVED_PATHS],
                                 "more_removed": max(0, len(d.removed_paths) - MAX_REMOVED_PATHS)}
        hunks = d.hunks()
        cost = len(json.dumps(hunks))
        if size + cost <= LIMIT:
            entry["hunks"], size = hunks, size + cost
        else:
            entry["hunks"], entry["clipped"] = [], True
        files.append(entry)
    target = path_of(settings, job_id)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"files": files}, fh)
    os.replace(tmp, target)


def load(settings: Settings, job_id: str) -> list[dict[str, Any]] | None:
    """The kept diff's files (``hunks``: ``{"header", "lines": [[tag, old_no, new_no, text]]}``), or None."""
    try:
        fd = os.open(path_of(settings, job_id), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        try:
            return json.load(fh)["files"]
        except (ValueError, KeyError, TypeError):
            return None


def render(files: list[dict[str, Any]]) -> str:
    """The kept diff as unified text (what ``review show`` prints for a decided job)."""
    out = []
    for f in files:
        out.append(f"--- {f['path']}: {f['note']}\n")
        for hunk in f.get("hunks") or []:
            out.append(hunk["header"] + "\n")
            out += [f"{tag}{text}\n" for tag, _old, _new, text in hunk["lines"]]
        if f.get("clipped"):
            out.append("(the lines of this file were not kept: the diff was too large)\n")
        for path in f.get("removed_paths") or []:
            out.append(f"removed: {path}\n")
        if f.get("more_removed"):
            out.append(f"... and {f['more_removed']} more removed\n")
    return "".join(out)

