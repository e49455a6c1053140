"""The executor's own vocabulary of what an agent did, and reading one line of an agent's JSON-lines stream.

Owns ``Event`` and its kinds, whatever agent CLI produced them: ``init`` (the run began: its session, the model
the CLI asked for), ``turn`` (the model's text), ``thinking`` (a glimpse), ``tool_call`` (``name`` as the CLI
calls the tool, ``id``, and ``file_path`` for a file it reads or edits, ``command`` for a shell command, else
``input``), ``tool_result`` (``tool_use_id``, ``is_error``, ``content``), ``api_retry`` (the CLI retries by
itself: ``error_status``, ``retry_delay_ms``), ``rate_limit`` (a provider's rate-limit notice), ``result`` (the
run's end: ``is_error``, ``usage``), ``usage`` (tokens of one turn, where a CLI reports them apart),
``agent_text`` (plain text the CLI printed) and ``other``. What a tool *does* (read, edit, shell) is each
agent's knowledge (``Agent.tool_action``). Also the clipping every event goes through, and ``parse_line``:
one stdout line as a JSON object, under a bound, whatever the agent wrote there.

Must never: talk to Docker, the database or the network, keep large payloads (file contents, thinking text,
signatures) beyond a short truncation, or name an agent's tools, flags or files.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ..untrusted import load_json

# Truncation limits: events go to logs and the database, never whole files or transcripts.
TOOL_INPUT_LIMIT = 2000
TOOL_RESULT_LIMIT = 2000
RESULT_TEXT_LIMIT = 4000
THINKING_LIMIT = 200
ACTIVITY_LIMIT = 160


@dataclass(frozen=True)
class Event:
    """One thing that happened in the run, e.g. ``Event("tool_call", {"name": ..., "command": "pytest -q"})``."""

    kind: str
    data: dict = field(default_factory=dict)


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
    """Text of a tool result's content: a string, or a list of blocks (text, image ...)."""
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


def text_event(msg: dict) -> list[Event]:
    """A line of plain text the CLI printed (``parse_line`` made it ``{"type": "_text"}``)."""
    return [Event("agent_text", {"text": clip(msg.get("text", ""), RESULT_TEXT_LIMIT)})]


#: A stream line longer than this is parsed under ``PARSE_BUDGET`` and one at a time across all jobs; shorter
#: ones (nearly all: partial messages are a few hundred bytes) are parsed at once.
SMALL_LINE = 64 * 1024
#: The most one stream line's parse may need (``untrusted.load_json``'s estimate); a line that could need
#: more is kept as text. The agent can write anything to its stdout: it must not size the executor.
PARSE_BUDGET = 16 * 2**20
_BIG_PARSE = threading.BoundedSemaphore(1)


def parse_line(raw: bytes | str) -> dict | None:
    """One stdout line as a dict; None for a blank line; ``{"type": "_text"}`` for plain text.

    A CLI sometimes prints plain text (warnings, a crash message) and a line can be split by a
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
