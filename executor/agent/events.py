"""The Claude Code CLI's ``--output-format stream-json`` lines, one at a time, as small typed events.

Owns parsing a stdout line (``parse_line``) and turning each message into ``Event`` values (turns, tool
calls with their file paths and shell commands, tool results, retries, rate-limit signals, the result),
clipped so that events can go to logs and the database.

Must never: talk to Docker, the database or the network, or keep large payloads (file contents, thinking
text, signatures) beyond a short truncation.

Facts this module relies on (seen in real transcripts of CLI 2.1.328, kept in ``tests/fixtures``):

* the first line is ``system/init`` with ``session_id`` and the model the CLI *resolved*;
* each ``assistant`` line carries ``message.model``, the model that really answered that turn, except
  the CLI's own error messages, which name the synthetic model ``<synthetic>``;
* while the CLI retries by itself it prints ``system/api_retry`` lines (``error_status`` 429, 529 ...);
* the last line is ``result``; ``subtype`` can be ``success`` even when ``is_error`` is true (an API
  error ends with ``terminal_reason: "api_error"``), so ``is_error`` is what counts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..untrusted import load_json

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



# --------------------------------------------------------------------------------------------------
# Small helpers


def clip(text: Any, limit: int) -> str:
    """``text`` as a string of at most about ``limit`` characters, saying how much was cut."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more chars]"


def one_line(text: str, limit: int = ACTIVITY_LIMIT) -> str:
    """First non-empty line of ``text``, clipped: activity strings must fit a status column."""
    for line in text.splitlines():
        if line.strip():
            text = line.strip()
            break
    else:
        text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def content_text(content: Any) -> str:
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
    return as_json(content)



# --------------------------------------------------------------------------------------------------
# 1. Lines


#: A stream line longer than this is parsed under ``PARSE_BUDGET`` and one at a time across all jobs; shorter
#: ones (nearly all: partial messages are a few hundred bytes) are parsed at once.
SMALL_LINE = 64 * 1024
#: The most one stream line's parse may need (``untrusted.load_json``'s estimate); a line that could need
#: more is kept as text. The agent can write anything to its stdout: it must not size the executor.
PARSE_BUDGET = 16 * 2**20
_BIG_PARSE = threading.BoundedSemaphore(1)


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
        if len(text) <= SMALL_LINE:
            msg = load_json(text)
        else:
            with _BIG_PARSE:
                msg = load_json(text, budget=PARSE_BUDGET)
    except ValueError:  # Unparsable: deep nesting included, a line the agent forged must not end the job
        return {"type": "_text", "text": text[:TOOL_RESULT_LIMIT]}
    # ``42`` or ``"hello"`` are valid JSON but not stream messages
    if not isinstance(msg, dict):
        return {"type": "_text", "text": text[:TOOL_RESULT_LIMIT]}
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
        glimpse = clip(block.get("thinking", "[redacted]"), THINKING_LIMIT)
        return Event("thinking", {**base, "text": glimpse})
    return Event("other", {**base, "type": f"assistant:{btype}"})


def _tool_call_data(block: dict) -> dict:
    name = block.get("name")
    tool_input = block.get("input")
    data: dict[str, Any] = {"name": name, "id": block.get("id")}
    if not isinstance(tool_input, dict):
        data["input"] = clip(as_json(tool_input), TOOL_INPUT_LIMIT)
        return data
    if name in FILE_TOOLS:
        # Write/Edit input holds whole file contents: the path is what a person needs
        data["file_path"] = tool_input.get("file_path") or tool_input.get("notebook_path")
    elif name == "Bash":
        data["command"] = clip(tool_input.get("command", ""), TOOL_INPUT_LIMIT)
    else:
        data["input"] = clip(as_json(tool_input), TOOL_INPUT_LIMIT)
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
                        "content": clip(content_text(block.get("content")), TOOL_RESULT_LIMIT),
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
                "result": clip(msg.get("result", ""), RESULT_TEXT_LIMIT),
            },
        )
    ]


def _text_events(msg: dict) -> list[Event]:
    return [Event("agent_text", {"text": clip(msg.get("text", ""), RESULT_TEXT_LIMIT)})]


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


