"""The running state of one Gemini CLI run, read line by line from ``--output-format stream-json``, and its
events in the executor's words.

Owns ``GeminiRun`` (``agent/seam.py``'s ``Run``): Gemini CLI 0.61.0's stream is ``init`` (its session id and
the model it asked for), ``message`` (``role``, ``content``, ``delta``: the assistant's text in pieces),
``tool_use`` (``tool_name``, ``tool_id``, ``parameters``), ``tool_result`` (``tool_id``, ``status``,
``output``), ``error`` and ``result`` (``status``, ``stats`` with the tokens); the names the CLI gives its
tools and what each does; how a run ended (``classify``).

Must never: talk to Docker, the database or the network, or keep large payloads beyond a short truncation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ...clock import utcnow
from ..describe import describe
from ..events import RESULT_TEXT_LIMIT, TOOL_INPUT_LIMIT, TOOL_RESULT_LIMIT, Event, clip, one_line
from ..outcome import Outcome

_ACTIONS = {"run_shell_command": "shell", "write_file": "edit", "replace": "edit", "read_file": "read",
            "read_many_files": "read"}
_STATUS = re.compile(r"\b(4\d\d|5\d\d)\b")
# Gemini CLI 0.61.0 ends a 429 with "[API Error: Resource has been exhausted ... try again later ...]", exit 173
_LIMITED = re.compile(r"RESOURCE_EXHAUSTED|resource has been exhausted|rate limit|too many requests", re.I)
_AUTH = re.compile(r"api key not valid|permission_denied|unauthenticated|invalid api key", re.I)


def tool_action(name: str) -> str | None:
    return _ACTIONS.get(name)


@dataclass
class GeminiRun:
    clock: Callable[[], datetime] = utcnow
    gemini_session_id: str | None = None
    models_seen: list[str] = field(default_factory=list)  # never named by the stream: the gateway reads them
    final_text: str = ""
    last_activity: str = ""
    lines: int = 0
    result: dict | None = None
    errors: list[str] = field(default_factory=list)
    _text: str = ""

    def feed(self, msg: dict | None) -> list[Event]:
        if msg is None:
            return []
        self.lines += 1
        events = self._events(msg)
        for event in events:
            label = {"tool_call": "tool_call ", "turn": "turn: ", "result": "result "}.get(event.kind)
            if label:
                self.last_activity = one_line(label + describe(event.kind, event.data))
        return events

    def _events(self, msg: dict) -> list[Event]:
        kind = msg.get("type")
        if kind == "init":
            sid = msg.get("session_id")
            self.gemini_session_id = sid if isinstance(sid, str) and re.fullmatch(r"[0-9a-f-]{36}", sid) else None
            return [Event("init", {"session_id": self.gemini_session_id, "model": msg.get("model")})]
        if kind == "message" and msg.get("role") == "assistant":
            piece = str(msg.get("content", ""))
            self._text = self._text + piece if msg.get("delta") else piece
            self.final_text = self._text
            return [Event("turn", {"text": clip(piece, RESULT_TEXT_LIMIT)})]
        if kind == "tool_use":
            self._text = ""
            params = msg.get("parameters") if isinstance(msg.get("parameters"), dict) else {}
            data = {"name": str(msg.get("tool_name")), "id": str(msg.get("tool_id"))}
            if "command" in params:
                data["command"] = clip(params["command"], TOOL_INPUT_LIMIT)
            elif "file_path" in params:
                data["file_path"] = clip(params["file_path"], TOOL_INPUT_LIMIT)
            else:
                data["input"] = clip(params, TOOL_INPUT_LIMIT)
            return [Event("tool_call", data)]
        if kind == "tool_result":
            return [Event("tool_result", {"tool_use_id": str(msg.get("tool_id")), "is_error": msg.get("status") != "success",
                                          "content": clip(msg.get("output") or msg.get("error"), TOOL_RESULT_LIMIT)})]
        if kind == "error":
            text = str(msg.get("message", ""))
            if len(self.errors) < 100:
                self.errors.append(text[:1000])
            return [Event("agent_text", {"text": clip(text, TOOL_RESULT_LIMIT), "severity": msg.get("severity")})]
        if kind == "result":
            self.result = msg
            error = msg.get("error") if isinstance(msg.get("error"), dict) else {}
            if error.get("message"):
                self.errors.append(str(error["message"])[:1000])
            return [Event("result", {"subtype": msg.get("status"), "is_error": msg.get("status") != "success",
                                     "usage": self._stats(), "result": clip(error.get("message"), RESULT_TEXT_LIMIT)})]
        return [Event("other", {"type": str(kind)})] if kind != "message" else []

    def _stats(self) -> dict:
        stats = (self.result or {}).get("stats")
        return {k: v for k, v in stats.items() if isinstance(v, int)} if isinstance(stats, dict) else {}

    @property
    def session_id(self) -> str | None:
        return self.gemini_session_id

    @property
    def ended(self) -> bool:
        return self.result is not None

    @property
    def error_statuses(self) -> list[int]:
        return [int(m.group(1)) for m in (_STATUS.search(e) for e in self.errors) if m]

    @property
    def cost_usd(self) -> float | None:
        return None

    @property
    def input_tokens(self) -> int | None:
        return self._stats().get("input_tokens")

    @property
    def output_tokens(self) -> int | None:
        return self._stats().get("output_tokens")


def classify(run: GeminiRun, exit_code: int | None) -> Outcome:
    """Success: a ``success`` result and exit 0. Else the statuses and words of its errors decide."""
    if run.result is not None and run.result.get("status") == "success" and exit_code in (0, None):
        return Outcome("success", clip(run.final_text, 200) or "completed")
    message = run.errors[-1] if run.errors else ""
    statuses = run.error_statuses
    shown = clip(message, 500)
    if 429 in statuses or _LIMITED.search(message):
        return Outcome("rate_limited", f"rate limited: {shown}")
    if any(s in (401, 403) for s in statuses) or _AUTH.search(message):
        return Outcome("auth_error", f"the API refused the credential: {shown}")
    if 503 in statuses:
        return Outcome("overloaded", f"overloaded: {shown}")
    if statuses:
        return Outcome("api_error", f"the API call failed: {shown}")
    if run.result is None:
        return Outcome("agent_error", f"the Gemini CLI ended without a result (exit code {exit_code}, {run.lines} "
                                      f"line(s) read, last activity: {run.last_activity or 'none'}){': ' + shown if shown else ''}")
    return Outcome("agent_error", f"the Gemini CLI's run ended {run.result.get('status')} (exit code {exit_code})"
                                  + (f": {shown}" if shown else ""))
