"""A scripted Gemini API on loopback, for driving the real Gemini CLI in tests (the tests' fake of the model
provider, beside ``scripted_api.py`` and ``scripted_responses.py``).

What it speaks: ``POST /v1beta/models/MODEL:streamGenerateContent?alt=sse`` answered as the real API does: an
SSE body of ``data: {chunk}`` events, each chunk a ``GenerateContentResponse`` (``candidates[0].content.parts``:
the text in a few pieces, or one ``functionCall``; the last with ``finishReason: "STOP"``), each carrying the
cumulative ``usageMetadata`` (``promptTokenCount``, ``candidatesTokenCount``, ``totalTokenCount``) and the
``modelVersion`` that answered; ``:generateContent`` gets the whole answer as one JSON body. Errors are the
API's JSON ``{"error": {"code", "message", "status"}}``. Anything else is 404.

Routing: a dict script keyed by a substring of the first user text of ``contents`` (the prompt); each key's
turns answer in order; an exhausted or unmatched script answers ``default`` (``GTurn.text("Done.")``).

Facts found with the real Gemini CLI 0.61.0 (``gemini -p ... --output-format stream-json --yolo -m MODEL``,
``GOOGLE_GEMINI_BASE_URL``, ``GEMINI_API_KEY``, a system settings file with ``security.auth.selectedType =
"gemini-api-key"``): one streaming request per model turn, the credential as ``x-goog-api-key``; shell
commands are the ``run_shell_command`` tool (``{"command": ...}``), run in the cwd.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = re.compile(r"^/v1beta/models/([^/:]+):(streamGenerateContent|generateContent)$")


@dataclass(frozen=True)
class GTurn:
    kind: str  # text | shell | error
    text: str = ""
    model: str | None = None
    status: int = 200

    @staticmethod
    def text(text: str, *, model: str | None = None) -> GTurn:
        return GTurn("text", text, model)

    @staticmethod
    def shell(command: str, *, model: str | None = None) -> GTurn:
        return GTurn("shell", command, model)

    @staticmethod
    def error(status: int, message: str) -> GTurn:
        return GTurn("error", message, status=status)


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: Any
    size: int
    model: str = ""


def first_user_text(body: Any) -> str:
    for item in body.get("contents") or [] if isinstance(body, dict) else []:
        if isinstance(item, dict) and item.get("role") == "user":
            return " ".join(p.get("text", "") for p in item.get("parts") or [] if isinstance(p, dict))
    return ""


@dataclass
class ScriptedGemini:
    script: dict[str, list[GTurn]] = field(default_factory=dict)
    default: GTurn = field(default_factory=lambda: GTurn.text("Done."))

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._queues = {k: list(v) for k, v in self.script.items()}
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> ScriptedGemini:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def next_turn(self, body: Any, request: RecordedRequest) -> GTurn:
        text = first_user_text(body)
        with self._lock:
            self._requests.append(request)
            for key, queue in self._queues.items():
                if key in text:
                    return queue.pop(0) if queue else self.default
        return self.default


class _Handler(BaseHTTPRequestHandler):
    api: ScriptedGemini
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.path.split("?")[0]
        found = PATH.match(path)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body, len(raw),
                                  found.group(1) if found else "")
        turn = self.api.next_turn(body, request)
        if not found or not isinstance(body, dict):
            return self._json(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        if turn.kind == "error":
            status = {429: "RESOURCE_EXHAUSTED", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}.get(turn.status, "INTERNAL")
            return self._json(turn.status, {"error": {"code": turn.status, "message": turn.text, "status": status}})
        model = turn.model or found.group(1)
        prompt = max(1, len(raw) // 4)
        if turn.kind == "shell":
            pieces = [[{"functionCall": {"name": "run_shell_command", "args": {"command": turn.text}}}]]
        else:
            size = max(1, -(-len(turn.text) // 3))
            pieces = [[{"text": turn.text[i:i + size]}] for i in range(0, len(turn.text), size)] or [[{"text": ""}]]
        chunks = []
        for n, parts in enumerate(pieces, 1):
            chunk = {"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
                     "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": 3 * n,
                                       "totalTokenCount": prompt + 3 * n}, "modelVersion": model}
            if n == len(pieces):
                chunk["candidates"][0]["finishReason"] = "STOP"
            chunks.append(chunk)
        if found.group(2) == "generateContent":
            return self._json(200, chunks[-1])
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            data = f"data: {json.dumps(chunk)}\r\n\r\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
