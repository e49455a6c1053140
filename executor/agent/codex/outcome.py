"""How a Codex run ended: success, rate limited, overloaded, auth error, API error or agent error.

Owns ``classify`` (from a ``CodexRun`` and the CLI's exit code) into an ``Outcome``: a completed turn and exit
0 is success; a failed turn is told apart by the HTTP status its message names (Codex 0.169.0 says
``exceeded retry limit, last status: 429 Too Many Requests`` or ``unexpected status 401 Unauthorized: ...``)
and its words. Returns data, never raises.

Must never: talk to Docker, the database or the network.
"""

from __future__ import annotations

import re
from datetime import datetime

from ..events import clip
from ..outcome import Outcome
from .events import status_in
from .stream import CodexRun

_AUTH = re.compile(r"invalid[_ ]api[_ ]key|incorrect api key|unauthori[sz]ed|authentication", re.I)
_SPENT = re.compile(r"insufficient[_ ]quota|exceeded your current quota|billing", re.I)
_STREAM = re.compile(r"stream disconnected|error sending request|connection", re.I)


def classify(run: CodexRun, exit_code: int | None, now: datetime | None = None) -> Outcome:
    """How the run ended, from what the stream said and the CLI's exit code (None: it was killed)."""
    if run.turn == "completed" and exit_code in (0, None):
        return Outcome("success", clip(run.final_text, 200) or "completed")
    message = run.failure or (run.errors[-1] if run.errors else "")
    if run.turn == "failed" or message:
        return _failed(message, exit_code)
    return Outcome("agent_error", f"the Codex CLI ended without finishing its turn (exit code {exit_code}, "
                                  f"{run.lines} line(s) read, last activity: {run.last_activity or 'none'})")


def _failed(message: str, exit_code: int | None) -> Outcome:
    status = status_in(message)
    shown = clip(message, 500)
    if status in (401, 403) or _AUTH.search(message):
        return Outcome("auth_error", f"the API refused the credential: {shown}")
    if _SPENT.search(message):
        return Outcome("api_error", f"the provider's quota or billing stops the run (waiting does not help): {shown}")
    if status == 429:
        return Outcome("rate_limited", f"rate limited: {shown}")
    if status in (503, 529):
        return Outcome("overloaded", f"overloaded: {shown}")
    if status is not None or _STREAM.search(message):
        return Outcome("api_error", f"the API call failed: {shown}")
    return Outcome("agent_error", f"the Codex turn failed (exit code {exit_code}): {shown}")
