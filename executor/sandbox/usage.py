"""What an API's own responses say about a request, read as they stream past the gateway: the part every API
shares.

Owns ``ResponseMeter``'s plumbing (a response's bytes; its server-sent-event lines, each kept only up to
``MAX_LINE`` while it is incomplete; a JSON body kept up to ``MAX_JSON``) and the fields every protocol fills:
the usage in the executor's four counts, the model that answered, the API's error message and code, and a
wait the body asked for. Which lines matter and what they mean is each API protocol's (``api.ApiProtocol``,
implemented by the agent packages): a subclass says so in ``_wanted``, ``_event`` and ``_body``.

Must never: hold back or change a byte of the response (it only looks), or keep more than a bounded amount
of it.
"""

from __future__ import annotations

import json
from typing import Any

#: The executor's usage counts (``ApiRequest`` columns), whatever the API calls them.
USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


class ResponseMeter:
    """Counts a response's bytes and reads what its protocol wants of it as it streams past, holding none of
    it back."""

    # Kept per connection, so they count in a job's bound (gateway.py): usage, model and error events are small
    # lines; a non-streaming answer (a CLI's small side calls) is well under a MiB.
    MAX_LINE = 64 * 1024  # an SSE line longer than this is not one worth reading; stop collecting it
    MAX_JSON = 1024 * 1024

    def __init__(self, content_type: str) -> None:
        self.sse = content_type.startswith("text/event-stream")
        self.json = content_type.startswith("application/json")
        self.usage: dict[str, int] = {}
        self.model: str | None = None
        self.error: str | None = None  # the API's error message, for an error answer
        self.error_code: str | None = None  # the API's own name for the error (a spend cap is told apart by it)
        self.retry_after: float | None = None  # seconds the answer's body asked to wait, if it said
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
                self._body(body)
        return dict(self.usage)

    def _feed_sse(self, chunk: bytes) -> None:
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""
        for line in lines:
            # a cheap substring test first keeps large text deltas cheap
            if line.startswith(b"data:") and self._wanted(line):
                self._event(loads(line[5:].strip()))

    # -- what a protocol reads -------------------------------------------------------------------------

    def _wanted(self, line: bytes) -> bool:
        """Whether an SSE data line may carry usage, the model or an error (the rest is not parsed)."""
        return False

    def _event(self, data: Any) -> None:
        """One parsed SSE data line of those ``_wanted`` let through."""

    def _body(self, body: dict) -> None:
        """A JSON answer (a non-streaming call, or an error), parsed whole."""

    def _merge(self, counts: dict[str, Any]) -> None:
        """Usage in the executor's keys; later values replace earlier ones (APIs send cumulative counts)."""
        for key in USAGE_KEYS:
            if isinstance(counts.get(key), int):
                self.usage[key] = counts[key]
