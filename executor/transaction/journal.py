"""A commit's journal: the plan of an apply, which of its phases is done, and each file's upper inode.

Owns ``jobs/<id>/commit-journal.json``, written (fsynced, renamed into place) before the apply touches
anything and again when its first phase is done, so an apply interrupted by a crash is finished from the
same plan: a file moved out of the upper dir before the crash is recognised by its inode in the repository.
A change that lands in git (``landing.py``) has its git plan here too, written with the first save (the
commit it lands is built before anything is touched) and again as each of its steps is done.

Must never: be written anywhere a job or the repository's owner can write (the job dir is root's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .upper import Entry


@dataclass
class Plan:
    entries: list[Entry]
    structure_done: bool = False
    git: dict | None = None  # the landing in git (landing.Landing as a dict), None: files only


def load(journal: Path | None) -> Plan | None:
    if journal is None or not journal.exists():
        return None
    data = json.loads(journal.read_text())
    return Plan([Entry(*e) for e in data["entries"]], data["structure_done"], data.get("git"))


def save(journal: Path | None, plan: Plan) -> None:
    if journal is None:
        return
    tmp = journal.with_name(journal.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"entries": [list(e) for e in plan.entries], "structure_done": plan.structure_done,
                   "git": plan.git}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(journal)
