"""A scripted Anthropic Messages API on loopback, for driving the real Claude Code CLI (and the
``anthropic`` SDK) in tests without a network or a real model.

Usage::

    with ScriptedAPI([Turn.tool("Write", {"file_path": p, "content": "hi\\n"}), Turn.text("Done.")]) as api:
        env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "sk-fake",
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", ...}
        run claude -p ... --output-format stream-json --verbose --include-partial-messages
        api.requests  # every request received, in order

What it speaks: ``POST /v1/messages`` (the CLI appends ``?beta=true``) answered as the real API does:
with ``stream: true`` an SSE body (``content-type: text/event-stream``, chunked) of ``message_start``,
``ping``, per block ``content_block_start`` / ``content_block_delta`` (``text_delta``, or
``input_json_delta`` with the tool input's JSON split into a few ``partial_json`` chunks) /
``content_block_stop``, then ``message_delta`` (``stop_reason`` ``tool_use`` or ``end_turn``, usage
``output_tokens``) and ``message_stop``; without it a plain JSON message. Errors are the API's JSON
``{"type": "error", "error": {"type": ..., "message": ...}}`` with the status and headers given.
``POST /v1/messages/count_tokens`` gets ``{"input_tokens": N}``; ``GET /`` and any ``HEAD`` get 200;
anything else 404 ``not_found_error``. Ids look like the real ones (``msg_...``, ``toolu_...``, unique).
Token counts are rough (request bytes / 4), enough for the CLI's cost and context bookkeeping.

Routing a request to a script: ``models`` (model id -> turn) answers every request for one of those
models with its turn, before anything else (a second model on the same endpoint, e.g. the compaction's
small model called through a runner's ``base_url``; such requests count as side requests); a list script
answers requests in order; a dict script is keyed by a substring of the first user message's text (the
first key found wins, in insertion order), so jobs with different prompts can share one server; with
``replay=True`` a keyed script answers by the conversation's place (a request that holds N answers gets turn
N), so a job run again after a fault replays its script; ``first`` gives a key's very first request a turn
of its own, once (a 429 the next attempt does not meet again). An exhausted (or unmatched) script answers
``default``, or ``Turn.text("Done.")`` if none was given. A list
script is the fallback for requests no dict key matches (keys added later with ``add()``).

Side requests never consume the script and are answered with the text ``"OK"``: a request asking for
``max_tokens`` <= 1 (quota / model probes) always is one; otherwise a request whose first user text
matches a dict key is scripted, and of the rest those offering no ``tools`` are side requests (the
rule is ``side_filter``, default ``is_side_request``; pass ``side_filter=lambda body: False`` to script
tool-less calls too, e.g. a compaction model called through the SDK with a list script). Facts found with
the real CLI 2.1.328 (linux-x64 binary), ``claude -p ... --output-format stream-json --verbose
--include-partial-messages --dangerously-skip-permissions`` with ``ANTHROPIC_BASE_URL`` /
``ANTHROPIC_API_KEY=sk-fake`` / ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` and a fresh ``HOME``:

- Only ``POST /v1/messages?beta=true``, always ``stream: true``, one per model turn, each offering
  ``tools`` (12 for the main agent; the rest are deferred behind ToolSearch) and ``max_tokens`` 32000
  (128000 for opus/haiku 5.5 ids). No side request at all was seen in ``-p`` runs: no title, quota,
  ``count_tokens`` or haiku request, whatever ``--model`` was (``sonnet`` ids, ``opus``, ``haiku``, an
  unknown id, which only prints ``[claude-code:unrecognized_model]`` on stderr). Without
  ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` one ``HEAD /api/hello`` comes first (answered 200 here).
- The binary does hold ``max_tokens: 1`` probes with no tools (``model_validation`` "Hi", a start-up
  model check ".", ``quota_check`` "quota", ``verify_api_key`` "test") and small tool-less helper
  calls (session title, tool-use summaries, WebFetch's summariser); the side-request rule above catches
  all of them should a flag or version turn them on. The answer to them is the text ``"OK"``.
- The first user message is a list of text blocks: several ``<system-reminder>`` blocks (environment,
  skills, date, ...) and then the ``-p`` prompt as the last block, so match script keys by substring.
  For some ids (``claude-opus-5-5``, ``claude-haiku-5-5``, unknown ids; not ``claude-sonnet-4-5``) the
  CLI also puts a ``role: "system"`` entry in ``messages``; it is ignored here.
- Requests ask for ``thinking``; answering without thinking blocks is accepted.
- The ``Agent`` tool starts a subagent that runs *concurrently* with the main loop: the main agent's
  next request and the subagent's requests (8 tools, first user message = the Agent ``prompt``) race for
  a list script. With subagents, use a dict script with a key that occurs in the subagent prompt.
- ``Edit`` of an existing file that was not ``Read`` in the same session fails with the tool error
  ``File has not been read yet. Read it first before writing to it.`` (a file made by ``Bash`` counts
  as not read); after ``Read``, or on a file this session created with ``Write``, it works. The run
  still ends ``subtype: success`` / ``is_error: false``. ``Bash`` runs in the cwd.
- As root, ``--dangerously-skip-permissions`` is refused (exit 1, stderr "cannot be used with
  root/sudo privileges") unless ``IS_SANDBOX=1`` is set.
- Errors: the CLI retries by itself, ``CLAUDE_CODE_MAX_RETRIES`` (default 10; 0 = no retry) bounds it,
  each retry printed as ``system/api_retry`` (``error``: ``rate_limit`` for 429, honouring
  ``retry-after: 1`` = a ~1 s delay; ``overloaded`` for 529, ~0.5 s first backoff;
  ``authentication_failed`` for 401 -- yes, 401 is retried too, with exponential backoff up to ~35 s,
  so a 401 run with default retries takes minutes). Then a ``<synthetic>`` assistant line with
  ``error`` ``rate_limit`` / ``server_error`` (529!) / ``authentication_failed``, and ``result`` with
  ``is_error: true``, ``terminal_reason: "api_error"``, ``api_error_status``, exit code 1.
- ``Turn.hang()``: after ``message_start`` the CLI waits silently, with no idle timeout of its own
  (150 s observed: no retry, no output past the ``message_start`` stream_event); the caller must kill it.
- Streaming is consumed incrementally: with ``--include-partial-messages`` each SSE event becomes a
  ``stream_event`` line as it arrives (``slow_text`` gives one line per delta, ``interval`` apart;
  ``ping`` is not passed on). ``Turn.after_pings`` sends pings for a while before the content: the CLI
  then prints nothing at all until the content comes (only a sealed job's gateway sees the pings).
"""

from __future__ import annotations

import itertools
import json
import secrets
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

DEFAULT_MODEL = "claude-sonnet-4-5"
SIDE_ANSWER = "OK"


# --------------------------------------------------------------------------------------------- turns


@dataclass(frozen=True)
class Turn:
    """One scripted answer to one request. Build with the static constructors."""

    kind: str  # "message" | "error" | "hang"
    blocks: tuple[tuple[str, Any, Any], ...] = ()  # ("text", text, None) | ("tool_use", name, input)
    model: str | None = None  # model named in the answer; None: the request's model
    status: int = 200
    error_type: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    chunks: int = 0  # slow_text: number of text deltas
    interval: float = 0.0  # slow_text: seconds between deltas
    pings: int = 0  # after_pings: ping events sent after message_start, before any content
    ping_interval: float = 0.0  # after_pings: seconds between them
    gate: Any = field(default=None, compare=False)  # gated_text: a threading.Semaphore released per next delta

    @staticmethod
    def tool(name: str, input: dict, text: str | None = None, *, model: str | None = None) -> Turn:
        """A tool_use answer (stop_reason ``tool_use``), with an optional text block before it."""
        blocks = (() if text is None else (("text", text, None),)) + (("tool_use", name, input),)
        return Turn("message", blocks, model=model)

    @staticmethod
    def tools(*calls: tuple[str, dict], model: str | None = None) -> Turn:
        """Several tool_use blocks in one answer (the CLI runs them all, then asks again)."""
        return Turn("message", tuple(("tool_use", name, inp) for name, inp in calls), model=model)

    @staticmethod
    def text(text: str, *, model: str | None = None) -> Turn:
        """A final text answer (stop_reason ``end_turn``)."""
        return Turn("message", (("text", text, None),), model=model)

    @staticmethod
    def slow_text(text: str, chunks: int, interval: float, *, model: str | None = None) -> Turn:
        """A text answer streamed as ``chunks`` deltas, ``interval`` seconds apart (steady progress)."""
        return Turn("message", (("text", text, None),), model=model, chunks=max(1, chunks), interval=interval)

    @staticmethod
    def gated_text(text: str, chunks: int, gate: Any, *, model: str | None = None) -> Turn:
        """A text answer streamed as ``chunks`` deltas, each after the first sent only once the test releases
        ``gate`` (a ``threading.Semaphore``): a test proves a chunk passed a relay before the next existed."""
        return Turn("message", (("text", text, None),), model=model, chunks=max(1, chunks), gate=gate)

    @staticmethod
    def after_pings(turn: Turn, count: int, interval: float) -> Turn:
        """``turn`` (streamed) preceded by ``count`` pings ``interval`` seconds apart after ``message_start``:
        a model that takes long to answer, as it looks on the wire (the CLI prints nothing for pings)."""
        return replace(turn, pings=count, ping_interval=interval)

    @staticmethod
    def error(status: int, type: str, message: str, headers: dict | None = None) -> Turn:
        """An API error, e.g. ``Turn.error(429, "rate_limit_error", "slow down", {"retry-after": "1"})``,
        ``Turn.error(529, "overloaded_error", "Overloaded")``, ``Turn.error(401, "authentication_error", ...)``."""
        return Turn("error", status=status, error_type=type, message=message,
                    headers=tuple((headers or {}).items()))

    @staticmethod
    def hang(*, model: str | None = None) -> Turn:
        """Send ``message_start`` (streaming) and then nothing, holding the connection until the server
        stops or the client goes away (for stall tests)."""
        return Turn("hang", model=model)

    @property
    def stop_reason(self) -> str:
        return "tool_use" if any(b[0] == "tool_use" for b in self.blocks) else "end_turn"


DONE = Turn.text("Done.")
SIDE_TURN = Turn.text(SIDE_ANSWER)


# ------------------------------------------------------------------------------------------ requests


@dataclass
class RecordedRequest:
    method: str
    path: str  # with the query string, e.g. "/v1/messages?beta=true"
    headers: dict[str, str]  # lower-case keys
    body: Any  # parsed JSON, or None
    size: int  # raw body size in bytes
    time: float  # time.time() when received
    side: bool = False  # a side request (answered without consuming the script)
    key: str | None = None  # the script key that answered it ("" for the list script), if any
    turn: Turn | None = None  # the answer given (messages requests only)
    usage: dict | None = None  # the usage the answer reported (messages answered with a message)

    @property
    def is_messages(self) -> bool:
        return self.method == "POST" and urlsplit(self.path).path == "/v1/messages"

    @property
    def first_user_text(self) -> str:
        return first_user_text(self.body)


def first_user_text(body: Any) -> str:
    """All the text of the first ``user`` message of a Messages request body."""
    if not isinstance(body, dict):
        return ""
    for msg in body.get("messages") or ():
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            parts = []
            for block in content or ():
                if isinstance(block, dict) and block.get("type") == "text":
                    parts.append(str(block.get("text", "")))
            return "\n".join(parts)
    return ""


def is_side_request(body: Any) -> bool:
    """The default ``side_filter``: no tools offered, or a ``max_tokens`` <= 1 probe."""
    if not isinstance(body, dict):
        return True
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens <= 1:
        return True
    return not body.get("tools")


# ------------------------------------------------------------------------------------------- server


class ScriptedAPI:
    """A threaded HTTP server on 127.0.0.1 (random port) answering Messages requests from a script."""

    def __init__(
        self,
        script: list[Turn] | dict[str, list[Turn]] | None = None,
        default: Turn | None = None,
        model_override: str | None = None,
        side_filter: Callable[[dict], bool] | None = None,
        models: dict[str, Turn] | None = None,
        cache_tokens: bool = False,
        replay: bool = False,
        first: dict[str, Turn] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._list: deque[Turn] = deque(script) if isinstance(script, list) else deque()
        self._keyed: dict[str, deque[Turn]] = {}
        if isinstance(script, dict):
            for key, turns in script.items():
                self._keyed[key] = deque(turns)
        self.default = default or DONE
        self.model_override = model_override
        self.side_filter = side_filter or is_side_request
        self.models = dict(models or {})  # a request for one of these models always gets its turn
        self.cache_tokens = cache_tokens  # report made-up (deterministic) cache-read and cache-write counts
        # Keyed scripts answer by the conversation's place, not in turn: a request holding N answers gets its
        # key's turn N, so an attempt run again (after a restart) hears the same script from its start.
        self.replay = replay
        self._first = dict(first or {})  # key -> the turn its first request gets, once, before its script
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle

    def start(self) -> ScriptedAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"scripted-api-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hung answers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- script

    def add(self, key: str, turns: list[Turn]) -> None:
        """Add a keyed script, or extend it if the key exists."""
        with self._lock:
            self._keyed.setdefault(key, deque()).extend(turns)

    def remaining(self, key: str | None = None) -> int:
        """Turns not yet used: of ``key``, or of the list script if None."""
        with self._lock:
            return len(self._list if key is None else self._keyed.get(key, ()))

    def _next_turn(self, body: dict) -> tuple[bool, str | None, Turn]:
        """(side, key, turn) for a Messages request."""
        if body.get("model") in self.models:
            return True, f"model:{body['model']}", self.models[body["model"]]  # never consumes the script
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens <= 1:
            return True, None, SIDE_TURN
        text = first_user_text(body)
        with self._lock:
            for key, turns in self._keyed.items():
                if key in text:
                    if key in self._first:
                        return False, key, self._first.pop(key)
                    if self.replay:
                        answered = sum(1 for m in body.get("messages") or () if isinstance(m, dict)
                                       and m.get("role") == "assistant")
                        return False, key, (turns[answered] if answered < len(turns) else self.default)
                    return False, key, (turns.popleft() if turns else self.default)
            if self.side_filter(body):
                return True, None, SIDE_TURN
            if self._list:
                return False, "", self._list.popleft()
            return False, None, self.default

    # -- records

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def conversation(self) -> list[RecordedRequest]:
        """The Messages requests that were answered from the script (side requests left out)."""
        return [r for r in self.requests if r.is_messages and not r.side]

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)


class _Server(ThreadingHTTPServer):
    # http.server's listen backlog is 5: twenty jobs' gateways opening connections at once overflow it and the
    # kernel resets some (seen as 502s at the gateway).
    request_queue_size = 128


# ------------------------------------------------------------------------------------------- handler

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):04d}{secrets.token_hex(8)}"


def _split(s: str, parts: int) -> list[str]:
    if parts <= 1 or len(s) <= 1:
        return [s]
    step = max(1, -(-len(s) // parts))
    return [s[i:i + step] for i in range(0, len(s), step)]


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    api: ScriptedAPI  # set on the subclass made by ScriptedAPI.start
    protocol_version = "HTTP/1.1"
    server_version = "scripted-api/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing

    def _read_body(self) -> tuple[bytes, Any]:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return raw, json.loads(raw) if raw else None
        except ValueError:
            return raw, None

    def _record(self, raw: bytes, body: Any, **kw: Any) -> RecordedRequest:
        req = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                              body, len(raw), time.time(), **kw)
        self.api._record(req)
        return req

    def _send_json(self, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", _new_id("req"))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, status: int, type_: str, message: str, headers: tuple = ()) -> None:
        self._send_json(status, {"type": "error", "error": {"type": type_, "message": message}}, headers)

    # -- verbs

    def do_HEAD(self) -> None:
        self._record(b"", None)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._record(b"", None)
        if urlsplit(self.path).path == "/":
            self._send_json(200, {"ok": True})
        else:
            self._send_error(404, "not_found_error", f"no route for GET {self.path}")

    def do_POST(self) -> None:
        raw, body = self._read_body()
        route = urlsplit(self.path).path
        if route == "/v1/messages/count_tokens":
            self._record(raw, body)
            self._send_json(200, {"input_tokens": max(1, len(raw) // 4)})
        elif route == "/v1/messages":
            self._messages(raw, body)
        else:
            self._record(raw, body)
            self._send_error(404, "not_found_error", f"no route for POST {self.path}")

    # -- messages

    def _messages(self, raw: bytes, body: Any) -> None:
        if not isinstance(body, dict):
            self._record(raw, body)
            self._send_error(400, "invalid_request_error", "body must be a JSON object")
            return
        side, key, turn = self.api._next_turn(body)
        req = self._record(raw, body, side=side, key=key, turn=turn)

        if turn.kind == "error":
            self._send_error(turn.status, turn.error_type, turn.message, turn.headers)
            return
        model = turn.model or self.api.model_override or body.get("model") or DEFAULT_MODEL
        usage = {"input_tokens": max(1, len(raw) // 4), "output_tokens": 1,
                 "cache_creation_input_tokens": 11 if self.api.cache_tokens else 0,
                 "cache_read_input_tokens": len(raw) // 8 if self.api.cache_tokens else 0}
        stream = bool(body.get("stream"))
        try:
            if turn.kind == "hang":
                if stream:
                    self._start_sse()
                    self._event("message_start", {"type": "message_start",
                                                  "message": _message(model, [], None, usage)})
                self._hold()
            elif stream:
                req.usage = self._stream(turn, model, usage)
            else:
                content = [_block(b) for b in turn.blocks]
                req.usage = {**usage, "output_tokens": _output_tokens(content)}
                self._send_json(200, _message(model, content, turn.stop_reason, req.usage))
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _stream(self, turn: Turn, model: str, usage: dict) -> dict:
        """Send ``turn`` as server-sent events; the usage it reported in the end."""
        self._start_sse()
        self._event("message_start", {"type": "message_start", "message": _message(model, [], None, usage)})
        self._event("ping", {"type": "ping"})
        for _ in range(turn.pings):
            self._sleep(turn.ping_interval)
            self._event("ping", {"type": "ping"})
        content = []
        for index, b in enumerate(turn.blocks):
            block = _block(b)
            content.append(block)
            if b[0] == "text":
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "text", "text": ""}})
                pieces = _split(b[1], turn.chunks or 3)
                for i, piece in enumerate(pieces):
                    if turn.interval and i:
                        self._sleep(turn.interval)
                    if turn.gate is not None and i:
                        self._wait_gate(turn.gate)
                    self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "text_delta", "text": piece}})
            else:
                self._event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {**block, "input": {}}})
                for piece in _split(json.dumps(block["input"]), 3):
                    self._event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "input_json_delta",
                                                                  "partial_json": piece}})
            self._event("content_block_stop", {"type": "content_block_stop", "index": index})
        self._event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": turn.stop_reason, "stop_sequence": None},
                                      "usage": {"output_tokens": _output_tokens(content)}})
        self._event("message_stop", {"type": "message_stop"})
        self._chunk(b"")  # end of the chunked body; the connection stays usable (keep-alive)
        return {**usage, "output_tokens": _output_tokens(content)}

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("request-id", _new_id("req"))
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, name: str, data: dict) -> None:
        self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())

    def _wait_gate(self, gate: Any) -> None:
        while not gate.acquire(timeout=0.1):
            if self.api._stopping.is_set():
                raise _ClientGone("server stopping")

    def _sleep(self, seconds: float) -> None:
        if self.api._stopping.wait(seconds):
            raise _ClientGone("server stopping")

    def _hold(self) -> None:
        """Keep the connection open, sending nothing, until the server stops or the client hangs up."""
        self.close_connection = True  # never finish this response
        while not self.api._stopping.wait(0.1):
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return  # client closed
            except OSError:
                return


def _block(b: tuple[str, Any, Any]) -> dict:
    if b[0] == "text":
        return {"type": "text", "text": b[1]}
    return {"type": "tool_use", "id": _new_id("toolu"), "name": b[1], "input": b[2]}


def _output_tokens(content: list[dict]) -> int:
    return max(1, len(json.dumps(content)) // 4)


def _message(model: str, content: list, stop_reason: str | None, usage: dict) -> dict:
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": dict(usage),
    }
