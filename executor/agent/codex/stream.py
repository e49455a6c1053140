"""The running state of one Codex run, updated line by line from ``codex exec --json``.

Owns ``CodexRun`` (``agent/seam.py``'s ``Run``): the thread id (the session a later job resumes), the agent's
last message, the turn's usage, the CLI's own reports of failed API calls (their HTTP statuses), how the turn
ended (``turn.completed`` or ``turn.failed``) and a one-line "what is it doing" for people.

Must never: talk to Docker, the database or the network, or read the clock other than through the ``clock``
it is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ...clock import utcnow
from ..describe import describe
from ..events import Event, one_line
from .events import events_for, status_in

#: What Codex's thread ids look like (UUIDs): anything else from the stream is never resumed.
THREAD_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class CodexRun:
    """Everything worth knowing about one run, updated line by line through ``feed``."""

    clock: Callable[[], datetime] = utcnow
    thread_id: str | None = None
    #: Codex never names the model that answered: the gateway reads it from the answers
    models_seen: list[str] = field(default_factory=list)
    final_text: str = ""
    last_activity: str = ""
    lines: int = 0
    #: the turn's end: ``completed`` or ``failed``, and the failure's message
    turn: str | None = None
    failure: str = ""
    #: the CLI's messages about failed API calls, in order (its retries' and its last)
    errors: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    _started: set[str] = field(default_factory=set)

    def feed(self, msg: dict | None) -> list[Event]:
        if msg is None:
            return []
        self.lines += 1
        events = events_for(msg, self._started)
        self._note(msg)
        for event in events:
            if event.kind == "turn" and event.data.get("text"):
                self.final_text = event.data["text"]
            self.last_activity = _activity(event) or self.last_activity
        return events

    def _note(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "thread.started" and isinstance(msg.get("thread_id"), str) and THREAD_ID.match(msg["thread_id"]):
            self.thread_id = msg["thread_id"]  # only an id: it goes into a later job's command line and a glob
        elif kind == "turn.completed":
            self.turn = "completed"
            usage = msg.get("usage")
            if isinstance(usage, dict):
                self.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        elif kind == "turn.failed":
            self.turn = "failed"
            error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
            self.failure = str(error.get("message", ""))[:1000]
        elif kind == "error" and len(self.errors) < 100:
            self.errors.append(str(msg.get("message", ""))[:1000])

    @property
    def session_id(self) -> str | None:
        return self.thread_id

    @property
    def ended(self) -> bool:
        return self.turn is not None

    @property
    def error_statuses(self) -> list[int]:
        statuses = [status_in(m) for m in [*self.errors, self.failure]]
        return [s for s in statuses if s is not None]

    @property
    def cost_usd(self) -> float | None:
        return None  # Codex reports tokens, never a price

    @property
    def input_tokens(self) -> int | None:
        return self.usage.get("input_tokens")

    @property
    def output_tokens(self) -> int | None:
        return self.usage.get("output_tokens")


_LABELS = {"tool_call": "tool_call ", "turn": "turn: ", "agent_text": "text: ", "api_retry": "api_retry ",
           "init": "init ", "result": "result ", "thinking": "thinking"}


def _activity(event: Event) -> str:
    if event.kind == "tool_result":  # the id, not the content
        d = event.data
        return one_line(f"tool_result {d.get('tool_use_id')}{' error' if d.get('is_error') else ''}")
    label = _LABELS.get(event.kind)
    return "" if label is None else one_line(label + describe(event.kind, event.data))
