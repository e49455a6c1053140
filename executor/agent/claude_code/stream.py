"""The running state of one Claude Code run, updated line by line from the CLI's stream.

Owns ``StreamState``: the Claude Code session id, which models answered, the CLI's own retries, rate-limit
and usage-limit signals, the final text and result, and a one-line "what is it doing" for people; and, for
the executor (``agent/seam.py``'s ``Run``), the same in its own words: the session to resume, whether the
CLI reported its end, the HTTP statuses of failed calls, the run's cost and tokens, and how it ended.

Must never: talk to Docker, the database or the network, or read the clock other than through the
``clock`` it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ...clock import utcnow
from ..describe import describe
from ..events import Event, one_line, parse_line
from .events import SYNTHETIC_MODEL, events_for
from .usage_limit import looks_like_usage_limit, parse_usage_limit

# --------------------------------------------------------------------------------------------------
# 3. State


@dataclass
class StreamState:
    """Everything worth knowing about one run, updated line by line through ``feed``."""

    clock: Callable[[], datetime] = utcnow
    claude_session_id: str | None = None
    init_model: str | None = None
    models_seen: list[str] = field(default_factory=list)
    result: dict | None = None
    lines: int = 0
    partial_lines: int = 0
    last_activity: str = ""
    api_retries: list[dict] = field(default_factory=list)
    rate_limit_events: list[dict] = field(default_factory=list)
    assistant_errors: list[str] = field(default_factory=list)
    final_text: str = ""
    #: the last API error text the CLI showed (its synthetic assistant text, or an error result)
    last_error_text: str = ""
    #: HTTP statuses / error types the CLI attached to its error lines, in order
    api_error_statuses: list[int] = field(default_factory=list)
    api_error_types: list[str] = field(default_factory=list)
    #: a usage-limit message was seen (text, reset time if it could be read)
    usage_limit_text: str | None = None
    usage_limit_resets_at: datetime | None = None
    _last_assistant_text: str = ""

    def feed(self, msg: dict | None) -> list[Event]:
        """Update the state with one parsed line and return its events."""
        if msg is None:  # a blank line
            return []
        self.lines += 1
        if msg.get("type") == "stream_event":
            self.partial_lines += 1
            return []
        self._note_message(msg)
        events = events_for(msg)
        for event in events:
            self._note_event(event)
        return events

    def feed_raw(self, raw: bytes | str) -> list[Event]:
        """``feed(parse_line(raw))``: for callers that hold raw stdout lines."""
        return self.feed(parse_line(raw))

    # -- in the executor's words (agent/seam.py's Run)

    @property
    def session_id(self) -> str | None:
        return self.claude_session_id

    @property
    def ended(self) -> bool:
        return self.result is not None

    @property
    def error_statuses(self) -> list[int]:
        """The statuses the CLI's error lines named, else those of its own retries."""
        statuses = self.api_error_statuses or [r.get("error_status") for r in self.api_retries]
        return [s for s in statuses if isinstance(s, int)]

    @property
    def cost_usd(self) -> float | None:
        return (self.result or {}).get("total_cost_usd")

    @property
    def input_tokens(self) -> int | None:
        return ((self.result or {}).get("usage") or {}).get("input_tokens")

    @property
    def output_tokens(self) -> int | None:
        return ((self.result or {}).get("usage") or {}).get("output_tokens")

    # -- what the raw message says that events do not carry

    def _note_message(self, msg: dict) -> None:
        kind = msg.get("type")
        if msg.get("session_id") and not self.claude_session_id:
            self.claude_session_id = msg["session_id"]
        if kind == "system" and msg.get("subtype") == "init":
            self.claude_session_id = msg.get("session_id") or self.claude_session_id
            self.init_model = msg.get("model")
            self._see_model(self.init_model)
        elif kind == "assistant":
            self._note_assistant(msg)
        elif kind == "result":
            self._note_result(msg)
        elif kind == "_text":
            self._check_usage_limit(str(msg.get("text", "")))

    def _note_assistant(self, msg: dict) -> None:
        message = msg.get("message") or {}
        self._see_model(message.get("model"))
        texts = [
            str(b.get("text", ""))
            for b in message.get("content") or []
            if isinstance(b, dict) and b.get("type") == "text"
        ]
        text = "\n".join(t for t in texts if t)
        if text:
            self._last_assistant_text = text
            self._check_usage_limit(text)
        is_cli_error = bool(
            msg.get("error")
            or msg.get("is_api_error_message")
            or message.get("model") == SYNTHETIC_MODEL
        )
        if msg.get("error"):
            self.assistant_errors.append(str(msg["error"]))
        if is_cli_error:
            if text:
                self.last_error_text = text
            self._note_api_error(msg)
        if not self.result:
            self.final_text = self._last_assistant_text

    def _note_result(self, msg: dict) -> None:
        self.result = msg
        if msg.get("session_id"):
            self.claude_session_id = msg["session_id"]
        text = msg.get("result")
        if isinstance(text, str) and text:
            self.final_text = text
            self._check_usage_limit(text)
            if msg.get("is_error"):
                self.last_error_text = text
        else:
            self.final_text = self._last_assistant_text
        if msg.get("is_error"):
            self._note_api_error(msg)

    def _note_api_error(self, msg: dict) -> None:
        status = msg.get("api_error_status")
        if isinstance(status, int):
            self.api_error_statuses.append(status)
        if msg.get("api_error_type"):
            self.api_error_types.append(str(msg["api_error_type"]))

    def _see_model(self, model: Any) -> None:
        # the synthetic model is the CLI talking, not a model that answered
        if not isinstance(model, str) or not model or model == SYNTHETIC_MODEL:
            return
        if model not in self.models_seen:
            self.models_seen.append(model)

    def _check_usage_limit(self, text: str) -> None:
        if not looks_like_usage_limit(text):
            return
        self.usage_limit_text = text
        resets_at = parse_usage_limit(text, self.clock())
        if resets_at is not None:
            self.usage_limit_resets_at = resets_at

    # -- what the events say

    def _note_event(self, event: Event) -> None:
        data = event.data
        if event.kind == "api_retry":
            self.api_retries.append(data)
        elif event.kind == "rate_limit":
            self.rate_limit_events.append(data)
        self.last_activity = _activity(event) or self.last_activity


#: How the activity line names each kind of event; kinds not listed ("other") never replace it.
_ACTIVITY = {"tool_call": "tool_call ", "turn": "turn: ", "agent_text": "text: ", "api_retry": "api_retry ",
             "rate_limit": "rate_limit ", "init": "init ", "result": "result ", "thinking": "thinking"}


def _activity(event: Event) -> str:
    """A short human line for the job's status column, e.g. ``tool_call Bash: pytest -q``."""
    d = event.data
    if event.kind == "tool_result":  # the id, not the content: a result can be a whole file
        return one_line(f"tool_result {d.get('tool_use_id')}{' error' if d.get('is_error') else ''}")
    label = _ACTIVITY.get(event.kind)
    return "" if label is None else one_line(label + describe(event.kind, d))
