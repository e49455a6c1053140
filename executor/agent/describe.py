"""One line for people about one event of a job's log: what the agent did, in words a person can act on.

Owns the wording of every event kind (tool calls with the path or command they touch, turns, tool
results, retries, state changes) for the CLI's ``log``, the web page, the liveness watchdog's "last
activity" and the stream's activity line.

Must never: include more than it is asked to (callers clip), or a whole file's content.
"""

from __future__ import annotations

import json
from typing import Any


def describe(kind: str, data: dict[str, Any]) -> str:
    """The event's content as one readable string (not clipped)."""
    if kind == "tool_call":
        return f"{data.get('name')}: {data.get('file_path') or data.get('command') or data.get('input') or ''}"
    if kind in ("turn", "agent_text"):
        return str(data.get("text", ""))
    if kind == "tool_result":
        return ("error: " if data.get("is_error") else "") + str(data.get("content", ""))
    if kind in ("state", "review"):
        return " ".join(f"{k}={v}" for k, v in data.items() if v not in (None, [], ""))
    if kind == "api_retry":
        return f"{data.get('error_status')} (attempt {data.get('attempt')}/{data.get('max_retries')})"
    if kind == "rate_limit":
        return str(data.get("status"))
    if kind == "init":
        return str(data.get("model"))
    if kind == "result":
        return f"{data.get('subtype')}{' error' if data.get('is_error') else ''}"
    if kind == "thinking":
        return ""
    return json.dumps(data, default=str)


def clipped(kind: str, data: dict[str, Any], limit: int) -> str:
    text = describe(kind, data)
    return text if len(text) <= limit else text[:limit]
