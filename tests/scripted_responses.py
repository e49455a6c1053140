"""A scripted OpenAI Responses API on loopback, for driving the real Codex CLI in tests without a network or a
real model (the tests' fake of the model provider, beside ``scripted_api.py``'s Messages API).

Usage::

    with ScriptedResponses({"write-file": [RTurn.shell("echo hi > a.txt"), RTurn.text("Done.")]}) as api:
        runner base_url = api.base_url  (ends in /v1, as Codex's provider base_url does)
        api.requests  # every request received, in order

What it speaks: ``POST /v1/responses`` answered as the real API does. With ``stream: true`` (Codex always
asks for it) an SSE body (``content-type: text/event-stream``, chunked, each event ``event: NAME`` and
``data: JSON``): ``response.created`` and ``response.in_progress`` (the response, its ``model``), then per
output item ``response.output_item.added``, for a message ``response.content_part.added``, a few
``response.output_text.delta`` and ``response.output_text.done`` / ``response.content_part.done``, for a
function call a few ``response.function_call_arguments.delta`` and ``.done``, then
``response.output_item.done``; last ``response.completed`` with the whole response and its ``usage``
(``input_tokens`` with ``input_tokens_details.cached_tokens``, ``output_tokens`` with
``output_tokens_details.reasoning_tokens``, ``total_tokens``). Without ``stream`` the response as one JSON
body. Errors are the API's JSON ``{"error": {"message", "type", "param", "code"}}`` with the status and
headers given. Anything else is 404.

Routing: a dict script is keyed by a substring of the *last* user message's text (a resumed thread's new
prompt is its last user message); each key's turns answer its requests in order; an exhausted or unmatched
script answers ``default`` (``RTurn.text("Done.")``). A shell call is Codex 0.169.0's ``exec_command`` tool
(``{"cmd": ...}``).

Facts found with the real Codex 0.169.0 (``codex exec --json`` with a custom provider, ``wire_api =
"responses"``): one ``POST /v1/responses`` per model turn, ``stream: true``, ``store: false``, the
credential as ``authorization: Bearer``; the input holds two developer messages (the executor's
``developer_instructions`` first), the environment context and the prompt as user messages, then for each
tool call its ``function_call`` and ``function_call_output``; tools offered include ``exec_command`` and
``write_stdin``. A 429 is retried ``request_max_retries`` times (honouring ``retry-after``), then the turn fails
``exceeded retry limit, last status: 429 Too Many Requests``; a 401 fails ``unexpected status 401
Unauthorized: ...``; a ``response.failed`` event or a stream cut before ``response.completed`` reads
``stream disconnected before completion: ...`` and is retried ``stream_max_retries`` times.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "gpt-5-codex"
_ids = itertools.count(1)


@dataclass(frozen=True)
class RTurn:
    kind: str  # "text" | "shell" | "error"
    text: str = ""
    model: str | None = None  # the model the answer names; None: the one asked for
    status: int = 200
    code: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def text(text: str, *, model: str | None = None) -> RTurn:
        return RTurn("text", text, model)

    @staticmethod
    def shell(command: str, *, model: str | None = None) -> RTurn:
        return RTurn("shell", command, model)

    @staticmethod
    def error(status: int, code: str, message: str, headers: dict | None = None) -> RTurn:
        return RTurn("error", message, status=status, code=code, headers=tuple((headers or {}).items()))


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    size: int
    usage: dict[str, int] | None = None  # what the answer reported, in the executor's counts

    def last_user_text(self) -> str:
        return last_user_text(self.body)


def last_user_text(body: Any) -> str:
    items = body.get("input") if isinstance(body, dict) else None
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                return content
            return " ".join(c.get("text", "") for c in content or [] if isinstance(c, dict))
    return ""


@dataclass
class ScriptedResponses:
    script: dict[str, list[RTurn]] = field(default_factory=dict)
    default: RTurn = field(default_factory=lambda: RTurn.text("Done."))

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._queues = {key: list(turns) for key, turns in self.script.items()}
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> ScriptedResponses:
        api = self

        class Handler(_Handler):
            pass

        Handler.api = api
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def next_turn(self, body: Any) -> RTurn:
        text = last_user_text(body)
        with self._lock:
            for key, queue in self._queues.items():
                if key in text:
                    return queue.pop(0) if queue else self.default
        return self.default

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _Handler(BaseHTTPRequestHandler):
    api: ScriptedResponses
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._json(404, {"error": {"message": "not found", "type": "invalid_request_error", "param": None,
                                   "code": "not_found"}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = RecordedRequest("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body, len(raw))
        self.api.record(request)
        if self.path.split("?")[0] != "/v1/responses" or not isinstance(body, dict):
            self.do_GET()
            return
        turn = self.api.next_turn(body)
        if turn.kind == "error":
            self._json(turn.status, {"error": {"message": turn.text, "type": turn.code, "param": None,
                                               "code": turn.code}}, turn.headers)
            return
        model = turn.model or str(body.get("model"))
        usage = {"input_tokens": max(1, len(raw) // 4), "input_tokens_details": {"cached_tokens": len(raw) // 8},
                 "output_tokens": 10 + len(turn.text) // 4, "output_tokens_details": {"reasoning_tokens": 0}}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        request.usage = {"input_tokens": usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"],
                         "cache_read_input_tokens": usage["input_tokens_details"]["cached_tokens"],
                         "output_tokens": usage["output_tokens"]}
        response = {"id": f"resp_{next(_ids):08d}", "object": "response", "created_at": 1796630000,
                    "status": "in_progress", "model": model, "output": [], "usage": None}
        item = _item(turn)
        if not body.get("stream"):
            self._json(200, {**response, "status": "completed", "output": [item], "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self._event("response.created", {"response": response})
        self._event("response.in_progress", {"response": response})
        self._item_events(item)
        self._event("response.completed", {"response": {**response, "status": "completed", "output": [item],
                                                        "usage": usage}})
        self.wfile.write(b"0\r\n\r\n")

    def _item_events(self, item: dict) -> None:
        added = {**item, "status": "in_progress"}
        if item["type"] == "message":
            added["content"] = []
        self._event("response.output_item.added", {"output_index": 0, "item": added})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            part = {"type": "output_text", "text": "", "annotations": []}
            self._event("response.content_part.added", {"item_id": item["id"], "output_index": 0,
                                                        "content_index": 0, "part": part})
            for piece in _split(text, 3):
                self._event("response.output_text.delta", {"item_id": item["id"], "output_index": 0,
                                                           "content_index": 0, "delta": piece})
            self._event("response.output_text.done", {"item_id": item["id"], "output_index": 0,
                                                      "content_index": 0, "text": text})
            self._event("response.content_part.done", {"item_id": item["id"], "output_index": 0,
                                                       "content_index": 0, "part": {**part, "text": text}})
        else:
            for piece in _split(item["arguments"], 3):
                self._event("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": 0,
                                                                       "delta": piece})
            self._event("response.function_call_arguments.done", {"item_id": item["id"], "output_index": 0,
                                                                  "arguments": item["arguments"]})
        self._event("response.output_item.done", {"output_index": 0, "item": item})

    def _event(self, name: str, data: dict) -> None:
        chunk = f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def _item(turn: RTurn) -> dict:
    n = next(_ids)
    if turn.kind == "shell":
        return {"type": "function_call", "id": f"fc_{n:08d}", "call_id": f"call_{n:08d}", "name": "exec_command",
                "arguments": json.dumps({"cmd": turn.text}), "status": "completed"}
    return {"type": "message", "id": f"msg_{n:08d}", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": turn.text, "annotations": []}]}


def _split(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
