"""A session's home: the agent's ``$HOME`` across the jobs of a session, where Claude Code keeps its
transcripts (so a rate-limited attempt can resume its conversation).

Owns the home's place under the state root and whether a transcript there can be resumed.

Must never: follow a symlink the agent planted when reading the home.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def session_home(sessions_dir: Path, session_id: str, uid: int, gid: int) -> Path:
    """The agent's home for a session: Claude Code keeps its transcripts there, so a retry can resume."""
    home = sessions_dir / session_id / "home"
    if not home.is_dir():
        home.mkdir(parents=True)
    os.chown(home, uid, gid)
    os.chmod(home, 0o700)
    return home


def transcript_readable(home: Path, claude_session_id: str) -> bool:
    """Whether Claude Code's transcript of a session is there and parses (else a retry starts fresh)."""
    for path in (home / ".claude" / "projects").glob(f"*/{claude_session_id}.jsonl"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return bool(lines) and all(json.loads(line) is not None for line in lines if line.strip())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
    return False
