"""The Codex CLI's ``exec --json`` stream in the executor's events.

Owns ``events_for`` (one parsed line of Codex 0.169.0's stream, which reports *items*: ``thread.started`` names
the thread (its session), ``turn.started`` / ``turn.completed`` (with the turn's usage) / ``turn.failed`` (with
the error) bound the run, ``item.started`` / ``item.updated`` / ``item.completed`` carry an agent message, a
reasoning summary, a command execution, a file change, an MCP tool call, a web search, a to-do list or a
warning, and a top-level ``error`` is the CLI's own report of a failed API call, ``Reconnecting...`` while it
retries), the names the executor gives Codex's items as tools, and what each of them does.

Facts (Codex 0.169.0): the stream never names the model that answered; a command is reported started (with
``command``) and completed (with ``aggregated_output`` and ``exit_code``); a file change is reported once,
completed, with its ``changes`` (``path``, ``kind``); an error item (``Model metadata ... not found``) is a
warning, not the end of the run.

Must never: keep large payloads (command output, file contents) beyond a short truncation.
"""

from __future__ import annotations

import re
from typing import Any

from ..events import RESULT_TEXT_LIMIT, THINKING_LIMIT, TOOL_INPUT_LIMIT, TOOL_RESULT_LIMIT, Event, clip

#: The tool names the executor's events give Codex's items, and what each does (the session's history).
SHELL, EDIT, MCP, WEB = "command_execution", "file_change", "mcp_tool_call", "web_search"
_ACTIONS = {SHELL: "shell", EDIT: "edit"}
#: The HTTP status a Codex error message names (``last status: 429 Too Many Requests``, ``unexpected status 401``).
STATUS = re.compile(r"\bstatus:? (\d{3})\b")


def tool_action(name: str) -> str | None:
    return _ACTIONS.get(name)


def status_in(message: str) -> int | None:
    found = STATUS.search(message)
    return int(found.group(1)) if found else None


def events_for(msg: dict, started: set[str]) -> list[Event]:
    """The events one parsed line stands for; ``started``: ids of the items whose call was already reported."""
    kind = msg.get("type")
    if kind == "thread.started":
        return [Event("init", {"session_id": msg.get("thread_id"), "model": None})]
    if kind in ("item.started", "item.updated", "item.completed") and isinstance(msg.get("item"), dict):
        return _item_events(msg["item"], kind == "item.completed", started)
    if kind == "turn.completed":
        return [Event("usage", {"usage": _usage(msg.get("usage"))})]
    if kind == "turn.failed":
        error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
        text = clip(error.get("message"), RESULT_TEXT_LIMIT)
        return [Event("result", {"subtype": "turn_failed", "is_error": True, "result": text})]
    if kind == "error":
        text = str(msg.get("message", ""))
        data = {"error_status": status_in(text), "error": clip(text, TOOL_RESULT_LIMIT)}
        return [Event("api_retry" if text.startswith("Reconnecting") else "agent_text",
                      data if text.startswith("Reconnecting") else {"text": clip(text, TOOL_RESULT_LIMIT)})]
    return [Event("other", {"type": str(kind)})]


def _item_events(item: dict, completed: bool, started: set[str]) -> list[Event]:
    itype, item_id = item.get("type"), str(item.get("id", ""))
    if itype == "agent_message":
        return [Event("turn", {"text": str(item.get("text", ""))})] if completed else []
    if itype == "reasoning":
        return [Event("thinking", {"text": clip(item.get("text", ""), THINKING_LIMIT)})] if completed else []
    if itype == "error":
        return [Event("agent_text", {"text": clip(item.get("message", ""), TOOL_RESULT_LIMIT), "warning": True})]
    call = _call(itype, item)
    if call is None:
        return [Event("other", {"type": f"item:{itype}"})] if completed else []
    events = []
    if item_id not in started:
        started.add(item_id)
        events.append(Event("tool_call", {"name": itype, "id": item_id, **call}))
    if completed:
        events.append(Event("tool_result", {"tool_use_id": item_id, **_result(itype, item)}))
    return events


def _call(itype: Any, item: dict) -> dict | None:
    if itype == SHELL:
        return {"command": clip(item.get("command"), TOOL_INPUT_LIMIT)}
    if itype == EDIT:
        changes = [c for c in item.get("changes") or [] if isinstance(c, dict)]
        first = str(changes[0].get("path", "")) if changes else ""
        return {"file_path": first, "input": clip(", ".join(f"{c.get('kind')} {c.get('path')}" for c in changes),
                                                  TOOL_INPUT_LIMIT)}
    if itype == MCP:
        return {"input": clip(f"{item.get('server')}.{item.get('tool')} {item.get('arguments')}", TOOL_INPUT_LIMIT)}
    if itype == WEB:
        return {"input": clip(item.get("query"), TOOL_INPUT_LIMIT)}
    return None


def _result(itype: Any, item: dict) -> dict:
    if itype == SHELL:
        code = item.get("exit_code")
        return {"is_error": code not in (0, None) or item.get("status") == "failed", "exit_code": code,
                "content": clip(item.get("aggregated_output"), TOOL_RESULT_LIMIT)}
    error = item.get("error")
    return {"is_error": item.get("status") == "failed" or bool(error),
            "content": clip(error if error else item.get("status", ""), TOOL_RESULT_LIMIT)}


def _usage(usage: Any) -> dict[str, int]:
    """A turn's usage in the executor's counts (Codex's input tokens include the cached ones)."""
    if not isinstance(usage, dict):
        return {}
    cached = usage.get("cached_input_tokens") if isinstance(usage.get("cached_input_tokens"), int) else 0
    counts = {"cache_read_input_tokens": cached}
    if isinstance(usage.get("input_tokens"), int):
        counts["input_tokens"] = usage["input_tokens"] - cached
    if isinstance(usage.get("output_tokens"), int):
        counts["output_tokens"] = usage["output_tokens"]
    return counts
