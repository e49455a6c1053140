"""Reading the Claude Code CLI's ``--output-format stream-json`` output.

Owns turning the CLI's stdout, one line at a time, into small typed events (for progress, logs and the
job's activity line), keeping the running state of one agent run (session id, which models answered,
retries, rate-limit signals, the final result), and classifying how the run ended (success, rate
limited, overloaded, auth error, API error, agent error), including the plan's usage-limit messages
and their reset time.

Must never: talk to Docker, the database or the network, read the clock other than through the
``now``/``clock`` it is given (defaulting to UTC now), or keep large payloads (file contents, thinking
text, signatures) beyond a short truncation. It returns data; turning an ``Outcome`` into an exception
is the caller's choice (``Outcome.to_error`` builds one, it never raises it).

Facts this module relies on (seen in real transcripts, see ``shared/fixtures/claude-stream``):

* the first line is ``system/init`` with ``session_id`` and the model the CLI *resolved*;
* each ``assistant`` line carries ``message.model``, the model that really answered that turn, except
  the CLI's own error messages, which name the synthetic model ``<synthetic>``;
* while the CLI retries by itself it prints ``system/api_retry`` lines (``error_status`` 429, 529 ...);
* the last line is ``result``; ``subtype`` can be ``success`` even when ``is_error`` is true (an API
  error ends with ``terminal_reason: "api_error"``), so ``is_error`` is what counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import AgentFailed, Overloaded, RateLimited

# The CLI's name for messages it writes itself (API errors): never a model that answered.
SYNTHETIC_MODEL = "<synthetic>"

# Truncation limits: events go to logs and the database, never whole files or transcripts.
TOOL_INPUT_LIMIT = 2000
TOOL_RESULT_LIMIT = 2000
RESULT_TEXT_LIMIT = 4000
THINKING_LIMIT = 200
ACTIVITY_LIMIT = 160

# Tools whose interesting input is the path they touch (NotebookEdit names it ``notebook_path``).
FILE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit", "Read"})

OUTCOME_KINDS = ("success", "rate_limited", "overloaded", "auth_error", "api_error", "agent_error")


# --------------------------------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
class Event:
    """One thing that happened in the run, e.g. ``Event("tool_call", {"name": "Bash", ...})``."""

    kind: str
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``kind`` is one of ``OUTCOME_KINDS``."""

    kind: str
    message: str
    retry_after: float | None = None
    resets_at: datetime | None = None

    @property
    def retryable(self) -> bool:
        # Only capacity problems go away by waiting; auth, spend caps and agent errors need a person.
        return self.kind in ("rate_limited", "overloaded")

    def to_error(self, **context: object) -> AgentFailed | None:
        """The exception that describes this outcome (not raised), or None for success."""
        if self.kind == "success":
            return None
        if self.kind == "overloaded":
            return Overloaded(self.message, retry_after=self.retry_after, **context)
        if self.kind == "rate_limited":
            return RateLimited(
                self.message, retry_after=self.retry_after, resets_at=self.resets_at, **context
            )
        return AgentFailed(self.message, kind=self.kind, **context)


# --------------------------------------------------------------------------------------------------
# Small helpers


def _clip(text: Any, limit: int) -> str:
    """``text`` as a string of at most about ``limit`` characters, saying how much was cut."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more chars]"


def _one_line(text: str, limit: int = ACTIVITY_LIMIT) -> str:
    """First non-empty line of ``text``, clipped: activity strings must fit a status column."""
    for line in text.splitlines():
        if line.strip():
            text = line.strip()
            break
    else:
        text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _content_text(content: Any) -> str:
    """Text of a tool_result's ``content``: a string, or a list of blocks (text, image ...)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            elif isinstance(block, dict):
                # images and the like: name them, never inline their (base64) payload
                parts.append(f"[{block.get('type', 'block')}]")
            else:
                parts.append(str(block))
        return "\n".join(parts)
    return _as_json(content)


def _epoch_to_datetime(value: Any) -> datetime | None:
    """An aware UTC datetime from epoch seconds (or milliseconds), or None if not a number."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if seconds > 1e12:  # milliseconds
        seconds /= 1000.0
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------------------------------
# 1. Lines


def parse_line(raw: bytes | str) -> dict | None:
    """One stdout line as a dict; None for a blank line; ``{"type": "_text"}`` for plain text.

    The CLI sometimes prints plain text (warnings, a crash message) and a line can be split by a
    concurrent write, so a line that is not a JSON object is data, not an error.
    """
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).decode("utf-8", errors="replace")
    text = raw.strip()
    if not text:
        return None
    try:
        msg = json.loads(text)
    except ValueError:
        return {"type": "_text", "text": text}
    # ``42`` or ``"hello"`` are valid JSON but not stream messages
    if not isinstance(msg, dict):
        return {"type": "_text", "text": text}
    return msg


# --------------------------------------------------------------------------------------------------
# 2. Events


def events_for(msg: dict) -> list[Event]:
    """The events one parsed line stands for (``stream_event`` partials stand for none)."""
    kind = msg.get("type")
    handler = _HANDLERS.get(kind)  # type: ignore[arg-type]
    if handler is not None:
        return handler(msg)
    return [Event("other", {"type": str(kind)})]


def _system_events(msg: dict) -> list[Event]:
    subtype = msg.get("subtype")
    if subtype == "init":
        tools = msg.get("tools")
        return [
            Event(
                "init",
                {
                    "session_id": msg.get("session_id"),
                    "model": msg.get("model"),
                    "cwd": msg.get("cwd"),
                    "claude_code_version": msg.get("claude_code_version"),
                    "tools": len(tools) if isinstance(tools, list) else 0,
                },
            )
        ]
    if subtype == "api_retry":
        return [
            Event(
                "api_retry",
                {
                    "attempt": msg.get("attempt"),
                    "max_retries": msg.get("max_retries"),
                    "retry_delay_ms": msg.get("retry_delay_ms"),
                    "error_status": msg.get("error_status"),
                    "error": msg.get("error"),
                },
            )
        ]
    # status ("requesting"), compact_boundary, hooks ...: worth a log line, nothing more
    return [Event("other", {"type": f"system:{subtype}", "status": msg.get("status")})]


def _assistant_events(msg: dict) -> list[Event]:
    message = msg.get("message") or {}
    base = {
        "model": message.get("model"),
        "message_id": message.get("id"),
    }
    if msg.get("parent_tool_use_id"):
        base["parent_tool_use_id"] = msg["parent_tool_use_id"]  # a subagent's turn
    if msg.get("error"):
        base["error"] = msg.get("error")
    events = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        events.append(_assistant_block_event(block, base, message.get("usage")))
    return events


def _assistant_block_event(block: dict, base: dict, usage: Any) -> Event:
    btype = block.get("type")
    if btype == "text":
        return Event("turn", {**base, "text": block.get("text", ""), "usage": usage})
    if btype in ("tool_use", "server_tool_use", "mcp_tool_use"):
        return Event("tool_call", {**base, **_tool_call_data(block)})
    if btype in ("thinking", "redacted_thinking"):
        # thinking can be long and carries a signature: keep a glimpse only, never the signature
        glimpse = _clip(block.get("thinking", "[redacted]"), THINKING_LIMIT)
        return Event("thinking", {**base, "text": glimpse})
    return Event("other", {**base, "type": f"assistant:{btype}"})


def _tool_call_data(block: dict) -> dict:
    name = block.get("name")
    tool_input = block.get("input")
    data: dict[str, Any] = {"name": name, "id": block.get("id")}
    if not isinstance(tool_input, dict):
        data["input"] = _clip(_as_json(tool_input), TOOL_INPUT_LIMIT)
        return data
    if name in FILE_TOOLS:
        # Write/Edit input holds whole file contents: the path is what a person needs
        data["file_path"] = tool_input.get("file_path") or tool_input.get("notebook_path")
    elif name == "Bash":
        data["command"] = _clip(tool_input.get("command", ""), TOOL_INPUT_LIMIT)
    else:
        data["input"] = _clip(_as_json(tool_input), TOOL_INPUT_LIMIT)
    return data


def _user_events(msg: dict) -> list[Event]:
    content = (msg.get("message") or {}).get("content")
    if not isinstance(content, list):
        return [Event("other", {"type": "user"})]  # a replayed prompt: nothing to report
    events = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            events.append(
                Event(
                    "tool_result",
                    {
                        "tool_use_id": block.get("tool_use_id"),
                        "is_error": bool(block.get("is_error", False)),
                        "content": _clip(_content_text(block.get("content")), TOOL_RESULT_LIMIT),
                    },
                )
            )
    return events


def _rate_limit_events(msg: dict) -> list[Event]:
    # {"type":"rate_limit_event","rate_limit_info":{"status":"allowed|allowed_warning|rejected",
    #  "resetsAt":<epoch s>,"rateLimitType":"five_hour|seven_day",...}} (CLI >= 2.1.45)
    info = msg.get("rate_limit_info") or {}
    if not isinstance(info, dict):
        info = {}
    return [
        Event(
            "rate_limit",
            {
                "status": info.get("status"),
                "resets_at": info.get("resetsAt"),
                "rate_limit_type": info.get("rateLimitType"),
                "utilization": info.get("utilization"),
                "overage_status": info.get("overageStatus"),
                "is_using_overage": info.get("isUsingOverage"),
            },
        )
    ]


def _result_events(msg: dict) -> list[Event]:
    return [
        Event(
            "result",
            {
                "subtype": msg.get("subtype"),
                "is_error": bool(msg.get("is_error", False)),
                "terminal_reason": msg.get("terminal_reason"),
                "num_turns": msg.get("num_turns"),
                "duration_ms": msg.get("duration_ms"),
                "total_cost_usd": msg.get("total_cost_usd"),
                "usage": msg.get("usage"),
                "session_id": msg.get("session_id"),
                "api_error_status": msg.get("api_error_status"),
                "result": _clip(msg.get("result", ""), RESULT_TEXT_LIMIT),
            },
        )
    ]


def _text_events(msg: dict) -> list[Event]:
    return [Event("agent_text", {"text": _clip(msg.get("text", ""), RESULT_TEXT_LIMIT)})]


_HANDLERS: dict[str, Callable[[dict], list[Event]]] = {
    "system": _system_events,
    "assistant": _assistant_events,
    "user": _user_events,
    "rate_limit_event": _rate_limit_events,
    "result": _result_events,
    "_text": _text_events,
    # partial messages: a heartbeat only; the full assistant line follows
    "stream_event": lambda msg: [],
}


# --------------------------------------------------------------------------------------------------
# 3. State


@dataclass
class StreamState:
    """Everything worth knowing about one run, updated line by line through ``feed``."""

    clock: Callable[[], datetime] = _utc_now
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


def _activity(event: Event) -> str:
    """A short human line for the job's status column, e.g. ``tool_call Bash: pytest -q``."""
    d = event.data
    if event.kind == "tool_call":
        detail = d.get("file_path") or d.get("command") or d.get("input") or ""
        return _one_line(f"tool_call {d.get('name')}: {detail}")
    if event.kind == "tool_result":
        return _one_line(f"tool_result {d.get('tool_use_id')}{' error' if d.get('is_error') else ''}")
    if event.kind == "turn":
        return _one_line(f"turn: {d.get('text', '')}")
    if event.kind == "thinking":
        return "thinking"
    if event.kind == "api_retry":
        return f"api_retry {d.get('error_status')} (attempt {d.get('attempt')}/{d.get('max_retries')})"
    if event.kind == "rate_limit":
        return f"rate_limit {d.get('status')}"
    if event.kind == "init":
        return f"init {d.get('model')}"
    if event.kind == "result":
        return f"result {d.get('subtype')}{' error' if d.get('is_error') else ''}"
    if event.kind == "agent_text":
        return _one_line(f"text: {d.get('text', '')}")
    return ""  # "other" lines do not replace a more useful activity


# --------------------------------------------------------------------------------------------------
# 4. Classification

# Loose on purpose: wording changes between CLI and API versions.
_AUTH_RE = re.compile(
    r"invalid api key|authentication_error|authentication[_ ]failed|permission_error|"
    r"please run /login|oauth token (?:has )?expired|invalid (?:x-api-key|bearer token)",
    re.I,
)
# A spend cap / billing stop is a 429 (or 400/402) that waiting minutes will not fix.
_SPEND_CAP_RE = re.compile(
    r"spend(?:ing)? (?:limit|cap)|specified api usage limit|credit balance|billing|"
    r"out of credits|monthly (?:usage|spend)|budget (?:limit|exceeded)|"
    r"not retryable|no retry-after|without (?:a )?retry-after",
    re.I,
)
_OVERLOADED_RE = re.compile(r"overloaded", re.I)


def classify(state: StreamState, exit_code: int | None, now: datetime | None = None) -> Outcome:
    """How the run ended, from everything ``state`` saw and the CLI's exit code."""
    now = _aware(now or state.clock())
    result = state.result
    ok_result = (
        result is not None
        and not result.get("is_error")
        and result.get("subtype") == "success"
        and exit_code in (0, None)
    )
    # A usage-limit text wins even over a "success" result: older CLIs returned it that way.
    if state.usage_limit_text:
        return _usage_limited(state, now)
    if ok_result:
        return Outcome("success", _clip(state.final_text, 200) or "completed")
    errored = _classify_api_error(state, now)
    if errored is not None:
        return errored
    if result is None:
        return Outcome(
            "agent_error",
            f"the Claude CLI ended without a result line (exit code {exit_code}, {state.lines} "
            f"line(s) read, last activity: {state.last_activity or 'none'})",
        )
    if result.get("is_error") or result.get("subtype") != "success":
        text = _clip(result.get("result") or "", 500)
        return Outcome(
            "agent_error",
            f"the agent's run ended with {result.get('subtype')} "
            f"(terminal_reason {result.get('terminal_reason')}, exit code {exit_code})"
            + (f": {text}" if text else ""),
        )
    return Outcome("agent_error", f"the Claude CLI exited {exit_code} after a success result")


def _classify_api_error(state: StreamState, now: datetime) -> Outcome | None:
    """auth > spend cap > rate limit > overload > other API error; None when no API error ended it.

    Only the CLI's own terminal reports decide that the run failed on an API error (an error result,
    an assistant line with ``error``, a rejected rate_limit_event): api_retry lines alone mean the
    CLI was retrying, and a run that recovered is judged by its result. Once failed, the retries'
    statuses help name the cause.
    """
    result = state.result or {}
    errored_result = bool(result.get("is_error"))
    rejected = [e for e in state.rate_limit_events if str(e.get("status") or "").lower() == "rejected"]
    if not (errored_result or state.assistant_errors or rejected):
        return None
    statuses = [r.get("error_status") for r in state.api_retries] + state.api_error_statuses
    kinds = [str(r.get("error") or "") for r in state.api_retries] + state.assistant_errors
    kinds += state.api_error_types
    signal = " ".join(kinds + [state.last_error_text])
    message = state.last_error_text or _clip(result.get("result") or "", 500)

    if any(s in (401, 403) for s in statuses) or _AUTH_RE.search(signal):
        return Outcome("auth_error", message or "the API refused the credentials")
    limited = 429 in statuses or bool(rejected) or any("rate_limit" in k for k in kinds)
    if (limited or any("billing" in k for k in kinds)) and _SPEND_CAP_RE.search(signal):
        # a spend cap says so and carries no retry-after: waiting will not fix it
        return Outcome("api_error", message or "spend cap reached (not retryable)")
    if limited:
        resets_at = _rate_limit_reset(rejected)
        return Outcome(
            "rate_limited",
            message or "rate limited (429)",
            retry_after=_retry_after(state, resets_at, now),
            resets_at=resets_at,
        )
    if 529 in statuses or any("overload" in k for k in kinds) or _OVERLOADED_RE.search(signal):
        return Outcome(
            "overloaded",
            message or "the API is overloaded (529)",
            retry_after=_retry_after(state, None, now),
        )
    if state.result is None:
        return None  # an API error line but no result: the CLI died; "without a result" says more
    api_failed = result.get("terminal_reason") == "api_error" or state.api_error_statuses
    if state.assistant_errors or api_failed:
        cause = result.get("api_error_status") or (state.assistant_errors or [""])[-1]
        return Outcome("api_error", message or f"API error {cause}".strip())
    return None


def _usage_limited(state: StreamState, now: datetime) -> Outcome:
    resets_at = state.usage_limit_resets_at
    retry_after = max(0.0, (resets_at - now).total_seconds()) if resets_at else None
    text = _clip(state.usage_limit_text or "", 300)
    if resets_at is not None:
        text = f"{text} (resets at {resets_at.isoformat()})"
    return Outcome("rate_limited", text, retry_after=retry_after, resets_at=resets_at)


def _rate_limit_reset(rejected: list[dict]) -> datetime | None:
    for event in reversed(rejected):
        when = _epoch_to_datetime(event.get("resets_at"))
        if when is not None:
            return when
    return None


def _retry_after(state: StreamState, resets_at: datetime | None, now: datetime) -> float | None:
    """Seconds to wait: a window's reset time beats the CLI's own short backoff delay."""
    if resets_at is not None:
        return max(0.0, (resets_at - now).total_seconds())
    for retry in reversed(state.api_retries):
        delay = retry.get("retry_delay_ms")
        if isinstance(delay, (int, float)):
            return delay / 1000.0
    return None


def _aware(moment: datetime) -> datetime:
    # a naive "now" is taken as UTC, so comparisons with aware reset times never raise
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------------
# 5. Usage-limit messages

# "Claude AI usage limit reached|1767225600" (older CLIs: epoch seconds after a pipe)
_EPOCH_LIMIT_RE = re.compile(r"usage limit reached\s*\|\s*(\d{9,14})", re.I)
# "You've hit your [session|weekly|Opus|...] limit · resets <when>", "5-hour limit reached ∙ resets
# 3am", "usage limit reached. Your limit will reset at 1pm (Europe/Lisbon)"
_LIMIT_PHRASE_RE = re.compile(
    r"(?:you(?:'|’|\u2019)?ve|you have) hit your\b[^.\n]{0,40}?\blimit"
    r"|\b(?:usage|session|weekly|opus|sonnet|\d+-hour) limit (?:reached|exceeded)"
    r"|\bout of extra usage\b",
    re.I,
)
_RESET_RE = re.compile(r"\bresets?\b(?:\s+(?:at|on))?\s*(?P<when>.+)", re.I | re.S)
_ZONE_RE = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9_+\-/]*)\s*\)")
_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
_MONTH = r"(?P<mon>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_MONTH_DAY_RE = re.compile(rf"\b{_MONTH}\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\b", re.I)
_DAY_MONTH_RE = re.compile(rf"\b(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+{_MONTH}", re.I)
_YEAR_RE = re.compile(r"\b(20\d\d)\b")
_WEEKDAY_RE = re.compile(r"\b(mon|tue|wed|thu|fri|sat|sun)[a-z]*\b\.?", re.I)
_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_AMPM_RE = re.compile(r"\b(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s*(?P<ap>[ap])\.?\s*m\b\.?", re.I)
_24H_RE = re.compile(r"\b(?P<h>\d{1,2}):(?P<m>\d{2})\b")


def looks_like_usage_limit(text: str) -> bool:
    """True when ``text`` is one of the plan's usage-limit messages (any wording seen so far)."""
    return bool(text) and bool(_EPOCH_LIMIT_RE.search(text) or _LIMIT_PHRASE_RE.search(text))


def parse_usage_limit(text: str, now: datetime) -> datetime | None:
    """The reset time of a plan usage-limit message, as an aware datetime; None if not one.

    Times without a date mean their next occurrence after ``now`` in the message's zone (UTC when
    the message names none). Also None when it is a usage-limit message whose time cannot be read
    (``looks_like_usage_limit`` tells those apart).
    """
    if not text:
        return None
    now = _aware(now)
    epoch = _EPOCH_LIMIT_RE.search(text)
    if epoch:
        return _epoch_to_datetime(epoch.group(1))
    phrase = _LIMIT_PHRASE_RE.search(text)
    if not phrase:
        return None
    reset = _RESET_RE.search(text, phrase.end())
    if not reset:
        return None
    return _parse_reset_when(reset.group("when"), now)


def _parse_reset_when(when: str, now: datetime) -> datetime | None:
    """``"Mon 9am (America/New_York)"``, ``"Nov 28, 5pm (UTC)"``, ``"4:20am"`` -> datetime."""
    when = when.split("\n", 1)[0]
    zone = _zone(when, now)
    if zone is None:
        return None
    clock_time, rest = _clock_time(when)
    local_now = now.astimezone(zone)
    month_day = _MONTH_DAY_RE.search(rest) or _DAY_MONTH_RE.search(rest)
    if month_day:
        return _on_date(month_day, rest, clock_time or time(0, 0), zone, local_now)
    if clock_time is None:
        return None
    weekday = _WEEKDAY_RE.search(rest)
    if weekday:
        target = _WEEKDAYS.index(weekday.group(1).lower())
        day = local_now.date() + timedelta(days=(target - local_now.weekday()) % 7)
        candidate = datetime.combine(day, clock_time, tzinfo=zone)
        return candidate if candidate > local_now else datetime.combine(
            day + timedelta(days=7), clock_time, tzinfo=zone)
    candidate = datetime.combine(local_now.date(), clock_time, tzinfo=zone)
    if candidate <= local_now:
        candidate = datetime.combine(local_now.date() + timedelta(days=1), clock_time, tzinfo=zone)
    return candidate


def _zone(when: str, now: datetime) -> ZoneInfo | timezone | None:
    match = _ZONE_RE.search(when)
    if not match:
        return now.tzinfo if isinstance(now.tzinfo, (ZoneInfo, timezone)) else timezone.utc
    name = match.group(1)
    if name.upper() in ("UTC", "GMT", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None  # a zone we cannot resolve: a guessed time would be worse than none


def _clock_time(when: str) -> tuple[time | None, str]:
    """The time of day in ``when`` and ``when`` without it (so "28" in "Nov 28" is not an hour)."""
    match = _AMPM_RE.search(when)
    if match:
        hour = int(match.group("h")) % 12 + (12 if match.group("ap").lower() == "p" else 0)
    else:
        match = _24H_RE.search(when)
        if not match:
            low = when.lower()
            if "midnight" in low:
                return time(0, 0), when
            if "noon" in low:
                return time(12, 0), when
            return None, when
        hour = int(match.group("h"))
    minute = int(match.group("m") or 0)
    if hour > 23 or minute > 59:
        return None, when
    return time(hour, minute), when[: match.start()] + " " + when[match.end():]


def _on_date(
    match: re.Match, rest: str, clock_time: time, zone: Any, local_now: datetime
) -> datetime | None:
    month = _MONTHS[match.group("mon")[:3].lower()]
    day = int(match.group("day"))
    year_match = _YEAR_RE.search(rest)
    year = int(year_match.group(1)) if year_match else local_now.year
    try:
        candidate = datetime.combine(date(year, month, day), clock_time, tzinfo=zone)
        # no year given and the date is well past: it means next year (a "Jan 2" seen in December)
        if not year_match and candidate < local_now - timedelta(days=1):
            candidate = datetime.combine(date(year + 1, month, day), clock_time, tzinfo=zone)
    except ValueError:  # Feb 30 and the like
        return None
    return candidate
