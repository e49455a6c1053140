"""The Claude Code CLI's ``--output-format stream-json`` lines as the executor's events (``agent/events.py``).

Owns turning each message into ``Event`` values (turns, tool calls with their file paths and shell commands,
tool results, retries, rate-limit signals, the result), clipped so that events can go to logs and the
database, and what each of the CLI's tools does (``tool_action``).

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

from collections.abc import Callable
from typing import Any

from ..events import (
    RESULT_TEXT_LIMIT,
    THINKING_LIMIT,
    TOOL_INPUT_LIMIT,
    TOOL_RESULT_LIMIT,
    Event,
    as_json,
    clip,
    content_text,
    parse_line,
    text_event,
)

__all__ = ["SYNTHETIC_MODEL", "Event", "events_for", "parse_line", "tool_action"]

# The CLI's name for messages it writes itself (API errors): never a model that answered.
SYNTHETIC_MODEL = "<synthetic>"

# Tools whose interesting input is the path they touch (NotebookEdit names it ``notebook_path``).
FILE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "NotebookEdit", "Read"})
#: What each tool does, for the session's history (files read, files changed, shell commands).
_ACTIONS = {"Read": "read", "Write": "edit", "Edit": "edit", "MultiEdit": "edit", "NotebookEdit": "edit",
            "Bash": "shell"}


def tool_action(name: str) -> str | None:
    """``read``, ``edit`` or ``shell`` for a tool of the CLI that does that, else None."""
    return _ACTIONS.get(name)


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


_HANDLERS: dict[str, Callable[[dict], list[Event]]] = {
    "system": _system_events,
    "assistant": _assistant_events,
    "user": _user_events,
    "rate_limit_event": _rate_limit_events,
    "result": _result_events,
    "_text": text_event,
    # partial messages: a heartbeat only; the full assistant line follows
    "stream_event": lambda msg: [],
}
