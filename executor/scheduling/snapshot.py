"""``status.json``: the serving loop's snapshot of itself, written every tick, read by every other process.

Owns the file's writing (atomically: a reader never sees half of it) and its reading, with its age. The
CLI's ``status`` and ``report``, the health check and the metrics read what the loop knew at its last tick
instead of asking the engine or walking the state root; a loop that stopped ticking leaves a stale file,
which is what "unhealthy" means.

Must never: be read by the serving loop as a source of truth (it only writes it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write(path: Path, snapshot: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(snapshot, indent=2) + "\n")
    tmp.replace(path)


def read(path: Path, now: float | None = None) -> dict[str, Any] | None:
    """The last snapshot with its ``age_seconds``, or None when there is none (the executor never ran here)."""
    try:
        snapshot = json.loads(path.read_text())
        ts = float(snapshot["ts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**snapshot, "age_seconds": round((now if now is not None else time.time()) - ts, 1)}
