"""Strict JSON for what a sealed job sends its gateway: one parse, nothing ambiguous, and a bound on its memory
known before it starts.

Owns ``estimate`` (an upper bound, from counts of the body's structural bytes, of the memory ``parse`` may
need: the decoded text, the strings, every container and value) and ``parse`` (the body's one strict parse:
UTF-8 exactly, no duplicate key at any depth, no NaN or Infinity, no nesting deeper than the parser can
take; anything else is ``BodyRefused`` with a message saying what is wrong). What the gateway checks is
what ``parse`` returned, and what it forwards is the very bytes it gave ``parse``: the upstream cannot read
a body differently from the gateway (the last of two "model" keys, a NaN, a lone surrogate byte).

Must never: let an exception other than ``BodyRefused`` escape a parse (RecursionError and MemoryError
included), parse a body whose estimate is above the budget it was given, or keep the body.

The estimate's constants were measured (tracemalloc peaks of ``json.loads`` with this module's hooks,
CPython 3.11) on the shapes that cost the most per byte: ``[{},{},...]`` 25x its size, ``[[[]]],...`` 35x,
``{"a":{"b":{}}},...`` 30x, ``[0.5,...]`` 9x; each constant is about twice the measured cost per byte.
Structural bytes inside strings are counted too (no scan for string bounds), which over-estimates text
full of commas and colons (source code: about 5 bytes per byte) and never under-estimates.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Bytes charged per structural byte (see the module docstring).
COST_OPEN = 96  # "{" or "[": a container (a dict or list object, its GC header, a pointer to it)
COST_COMMA = 48  # ",": one more value (a slot, a float or int object)
COST_COLON = 160  # ":": one more member (the pairs list's tuple, the dict's entry, the key's str)
COST_QUOTE = 40  # '"': half a string object's header
#: A \\u escape that makes a wider character than the text around it (U+0100 and up).
SLACK = 64 * 1024  # the parser's own small allocations
_WIDE_ESCAPE = re.compile(rb"\\u(?!00)")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")
_FOUR_BYTE_LEADS = (b"\xf0", b"\xf1", b"\xf2", b"\xf3", b"\xf4")


class BodyRefused(Exception):
    """The gateway answers this request itself: ``status`` and the API's error ``type_``, and why."""

    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type_ = type_
        self.message = message


def _width(body: bytes) -> int:
    """Bytes per character of the text ``body`` decodes to (CPython's str: 1, 2 or 4)."""
    if body.isascii():
        return 1
    return 4 if any(lead in body for lead in _FOUR_BYTE_LEADS) else 2


def estimate(body: bytes) -> int:
    """An upper bound of the bytes ``decode`` and ``loads`` hold at their peak for ``body``: the body and its
    text while it decodes; then the text, every string parsed from it (a quarter more when some hold an
    escape: the parser's buffer grows as it goes), every container and value."""
    n = len(body)
    text = _width(body)
    strings = text
    if _SURROGATE_ESCAPE.search(body):
        strings = 4
    elif strings < 2 and _WIDE_ESCAPE.search(body):
        strings = 2
    payload = n * strings + (n * strings // 4 if b"\\" in body else 0)
    values = (COST_OPEN * (body.count(b"{") + body.count(b"[")) + COST_COMMA * body.count(b",")
              + COST_COLON * body.count(b":") + COST_QUOTE * body.count(b'"'))
    return n * text + max(n, payload) + values + SLACK


def small(body: bytes, containers: int) -> bool:
    """Whether ``body`` is cheap enough to parse on the event loop itself (a few ms at most)."""
    return body.count(b"{") + body.count(b"[") <= containers


def decode(body: bytes, budget: int) -> str:
    """The body's text, if its parse fits ``budget``; ``BodyRefused`` otherwise. Hand it a body nothing else
    holds (``decode(read())``): the estimate counts the bytes only while they decode."""
    needed = estimate(body)
    if needed > budget:
        raise BodyRefused(413, "request_too_large",
                          f"request body of {len(body)} bytes could need up to {needed >> 20} MiB to check, more than "
                          f"the gateway's {budget >> 20} MiB for one body (EXECUTOR_GATEWAY_PARSE_MEMORY): send a "
                          "smaller body")
    try:
        return body.decode("utf-8")  # strict: no surrogate or overlong byte sequence passes
    except UnicodeDecodeError as exc:
        raise BodyRefused(400, "invalid_request_error",
                          f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None


def loads(text: str) -> Any:
    """The value of ``text``, parsed strictly; ``BodyRefused`` says what is wrong with it."""
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise BodyRefused(400, "invalid_request_error", f"request body has the key {exc.key!r} twice in one "
                                                        "object: every key must be unique") from None
    except RecursionError:
        raise BodyRefused(400, "invalid_request_error",
                          "request body is nested deeper than the gateway parses (about 900 levels)") from None
    except MemoryError:
        raise BodyRefused(413, "request_too_large", "request body needs more memory to check than the gateway "
                                                    "has for it: send a smaller body") from None
    except ValueError as exc:  # JSONDecodeError, NaN / Infinity, an integer of more than 4300 digits
        raise BodyRefused(400, "invalid_request_error", f"request body is not strict JSON: {exc}") from None


def parse(body: bytes, budget: int) -> Any:
    """The value of a body its caller keeps (a small one): ``loads(decode(body))`` within ``budget``."""
    return loads(decode(body, budget - len(body)))


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key[:100])
            seen.add(key)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
