"""What the API's own responses say about a request, read as they stream past the gateway.

Owns ``ResponseMeter`` (a response's bytes, its token usage from ``message_start`` / ``message_delta`` or a
JSON body, the model that answered, the error message of an error answer), the rate-limit headers worth
keeping (``retry-after``, ``anthropic-ratelimit-*``), and the shape of an error the gateway answers itself
(the API's own JSON errors, so the CLI reports it as it would a real one).

Must never: hold back or change a byte of the response (it only looks), or keep more than a bounded
amount of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class ResponseMeter:
    """Counts a response's bytes and reads its usage as it streams past, holding none of it back."""

    # Kept per connection, so they count in a job's bound (gateway.py): usage, model and error events are small
    # lines; a non-streaming answer (the CLI's small side calls) is well under a MiB.
    MAX_LINE = 64 * 1024  # an SSE line longer than this is not a usage event; stop collecting it
    MAX_JSON = 1024 * 1024

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self.json = content_type.startswith("application/json")
        self.usage: dict[str, int] = {}
        self.model: str | None = None
        self.error: str | None = None  # the API's error message, for an error answer
        self.bytes = 0
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        if self.sse:
            self._feed_sse(chunk)
        elif self.json and len(self._buffer) + len(chunk) <= self.MAX_JSON:
            self._buffer += chunk

    def finish(self) -> dict[str, int]:
        if self.json and self._buffer:
            body = loads(self._buffer)
            self._buffer = b""
            if isinstance(body, dict):
                self._merge(body.get("usage"))
                self.model = body.get("model") if isinstance(body.get("model"), str) else self.model
                error = body.get("error")
                if isinstance(error, dict) and isinstance(error.get("message"), str):
                    self.error = error["message"][:500]
        return dict(self.usage)

    def _feed_sse(self, chunk: bytes) -> None:
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""
        for line in lines:
            # Only two event types carry usage (and error events a message); a substring test keeps large
            # text deltas cheap.
            if line.startswith(b"data:") and (b'"message_start"' in line or b'"message_delta"' in line
                                              or b'"error"' in line):
                self._event(loads(line[5:].strip()))

    def _event(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if data.get("type") == "message_start":
            message = data.get("message") or {}
            self._merge(message.get("usage"))
            if isinstance(message.get("model"), str):
                self.model = message["model"]
        elif data.get("type") == "message_delta":
            self._merge(data.get("usage"))  # cumulative counts: later values replace earlier ones
        elif data.get("type") == "error" and isinstance(data.get("error"), dict):
            self.error = str(data["error"].get("message", ""))[:500]

    def _merge(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for key in USAGE_KEYS:
                if isinstance(usage.get(key), int):
                    self.usage[key] = usage[key]


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k == "retry-after" or k.startswith("anthropic-ratelimit-")}


def api_error(status: int, type_: str, message: str, retry: bool = False
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An answer shaped like the API's own errors, so the CLI reports it as it would a real one.
    ``x-should-retry`` is the API's own hint to its SDKs on whether to try again."""
    body = json.dumps({"type": "error", "error": {"type": type_, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-should-retry", b"true" if retry else b"false")]
    return status, headers, body
