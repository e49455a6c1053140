"""``runners.toml`` while the executor serves: re-read when it changes, and what to do when it is broken.

Owns the reload rule. The file is read at start (a broken file then stops the executor with its error) and
again only when it changed (inode, size or mtime: an editor's rename counts). A file broken while serving
keeps the previous runners in use, is logged once per change (not every tick), and is a problem ``status``
shows until the file is fixed.

Must never: drop the runners in use because of a broken file, or log the same breakage twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from ..policy import Runner, load_runners

log = logging.getLogger(__name__)


class RunnersFile:
    def __init__(self, policies: Path) -> None:
        self.policies = policies
        self.runners: dict[str, Runner] = load_runners(policies)  # at start, a broken file is fatal
        self.problem: str | None = None  # why the file as it is now is not in use
        self._seen = _signature(policies / "runners.toml")

    def reload(self) -> bool:
        """Re-read the file if it changed; True when the runners in use changed."""
        seen = _signature(self.policies / "runners.toml")
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            self.runners = load_runners(self.policies)
        except ConfigError as exc:
            self.problem = f"{exc}; the previous runners stay in use until the file is fixed"
            log.error("runners.toml unreadable; keeping the previous runners", extra={"error": str(exc)})
            return False
        self.problem = None
        return True


def _signature(path: Path) -> tuple | None:
    """What tells a changed file from the one read last (an editor's rename makes a new inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
