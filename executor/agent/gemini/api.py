"""The Gemini API as a sealed Gemini CLI job's gateway speaks it.

Owns the routes the CLI calls (``POST /v1beta/models/{model}:streamGenerateContent`` and ``:generateContent``:
the model is named in the path), the credential (``x-goog-api-key``; a ``key`` query parameter is never
forwarded), the answer's usage and model (``usageMetadata`` and ``modelVersion`` of each streamed chunk, or a
JSON body), its errors (``{"error": {"code", "message", "status"}}``) and which answers are weather (429
``RESOURCE_EXHAUSTED``, 503 ``UNAVAILABLE``).

Facts: Gemini CLI 0.61.0 (``gemini -p ... --output-format stream-json`` with ``GOOGLE_GEMINI_BASE_URL`` and
``GEMINI_API_KEY``, ``security.auth.selectedType = "gemini-api-key"``) sends ``POST
{base}/v1beta/models/MODEL:streamGenerateContent?alt=sse`` with ``x-goog-api-key``, one per model turn. Its
stream reports the model it asked for, never the one that answered: the gateway reads ``modelVersion`` and
cuts an answer from another model (``checks_answers``).

Must never: hold a credential, or keep more of an answer than ``ResponseMeter`` bounds.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from ...sandbox.api import ApiProtocol, Route, json_error
from ...sandbox.usage import ResponseMeter

PUBLIC_API = "https://generativelanguage.googleapis.com"
ROUTE = re.compile(r"^/v1(?:beta)?/models/([A-Za-z0-9._-]{1,200}):(streamGenerateContent|generateContent)$")
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
           502: "UNAVAILABLE", 503: "UNAVAILABLE"}


class GeminiMeter(ResponseMeter):
    """Usage and model from each chunk's ``usageMetadata`` / ``modelVersion`` (cumulative), errors."""

    def _wanted(self, line: bytes) -> bool:
        return b'"usageMetadata"' in line or b'"modelVersion"' in line or b'"error"' in line

    def _event(self, data: Any) -> None:
        if isinstance(data, dict):
            self._body(data)

    def _body(self, body: Any) -> None:
        if isinstance(body, list):  # a JSON answer of a streaming call without alt=sse is a list of chunks
            for chunk in body[:1000]:
                self._body(chunk)
            return
        if not isinstance(body, dict):
            return
        if isinstance(body.get("modelVersion"), str):
            self.model = body["modelVersion"]
        usage = body.get("usageMetadata")
        if isinstance(usage, dict):
            cached = usage.get("cachedContentTokenCount") if isinstance(usage.get("cachedContentTokenCount"), int) else 0
            counts: dict[str, int] = {"cache_read_input_tokens": cached}
            if isinstance(usage.get("promptTokenCount"), int):
                counts["input_tokens"] = usage["promptTokenCount"] - cached
            if isinstance(usage.get("candidatesTokenCount"), int):
                counts["output_tokens"] = usage["candidatesTokenCount"]
            self._merge(counts)
        error = body.get("error")
        if isinstance(error, dict):
            if isinstance(error.get("message"), str):
                self.error = error["message"][:500]
            if isinstance(error.get("status"), str):
                self.error_code = error["status"][:100]


class Gemini(ApiProtocol):
    name = "gemini"
    default_base_url = PUBLIC_API
    credential_headers = frozenset({"x-goog-api-key", "authorization"})
    checks_answers = True

    def route(self, method: str, path: str) -> Route | None:
        found = ROUTE.match(path) if method == "POST" else None
        return Route("path", found.group(1)) if found else None

    def forward_path(self, path: str, query: str) -> str:
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() != "key"]
        return path + (f"?{urlencode(kept)}" if kept else "")

    def auth_headers(self, credential: str, auth_type: str) -> dict[str, str]:
        return {"x-goog-api-key": credential}

    def meter(self, content_type: str) -> ResponseMeter:
        return GeminiMeter(content_type)

    def weather(self, status: int, meter: ResponseMeter | None = None) -> str | None:
        return {429: "rate_limited", 503: "overloaded"}.get(status)

    def error(self, status: int, type_: str, message: str, retry: bool = False
              ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return json_error(status, {"error": {"code": status, "message": message,
                                             "status": _STATUS.get(status, "INTERNAL")}})


GEMINI_API = Gemini()
