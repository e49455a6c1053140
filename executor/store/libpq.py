"""A read-only PostgreSQL connection for the command line, on libpq itself (through ``ctypes``).

``executor jobs``, ``show`` and an idle ``status`` answer within a tenth of a second; importing psycopg alone
takes a third of a second of CPU (it loads asyncio, its adapters and its error classes), so these commands
talk to libpq directly: the libpq psycopg's binary wheel ships (found on disk, without importing psycopg),
else the system's ``libpq.so.5``. When neither loads, ``reads.py`` uses psycopg as before.

Owns loading libpq, connecting (read-only transactions, UTC, a 10 s connect timeout), running one statement
with its parameters sent apart from the SQL (``PQexecParams``, text format), and turning the text results
into Python values by each column's type (booleans, integers, floats, JSON, timestamps; anything else stays
text), as mapping rows.

Must never: put a value into SQL text (parameters always go apart), write (the session is read-only), or
keep a ``PGresult`` beyond the call that made it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

_OK = (1, 2)  # PGRES_COMMAND_OK, PGRES_TUPLES_OK
_CONNECTION_OK = 0
_BOOL, _INTS, _FLOATS, _JSON = 16, {20, 21, 23, 26}, {700, 701, 1700}, {114, 3802}
_TIMES = {1114, 1184}
_lib: ctypes.CDLL | None = None


class LibpqError(Exception):
    """libpq refused: the connection or the statement failed (its message says why)."""


def _candidates() -> Iterator[str]:
    spec = importlib.util.find_spec("psycopg_binary")  # finds the package without running it
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            libs = Path(location).parent / "psycopg_binary.libs"
            yield from (str(p) for p in sorted(libs.glob("libpq*.so*")))
    import ctypes.util  # only here: it imports subprocess and tempfile

    found = ctypes.util.find_library("pq")
    yield from ([found] if found else [])
    yield "libpq.so.5"


def load() -> ctypes.CDLL:
    """libpq, loaded once (``OSError`` when there is none)."""
    global _lib
    if _lib is not None:
        return _lib
    error: OSError | None = None
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            error = exc
            continue
        _declare(lib)
        _lib = lib
        return lib
    raise error or OSError("libpq not found")


def _declare(lib: ctypes.CDLL) -> None:
    p, c, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for name, restype, argtypes in (
            ("PQconnectdbParams", p, [ctypes.POINTER(c), ctypes.POINTER(c), i]), ("PQstatus", i, [p]),
            ("PQerrorMessage", c, [p]), ("PQfinish", None, [p]),
            ("PQexecParams", p, [p, c, i, p, ctypes.POINTER(c), p, p, i]), ("PQresultStatus", i, [p]),
            ("PQresultErrorMessage", c, [p]), ("PQclear", None, [p]), ("PQntuples", i, [p]), ("PQnfields", i, [p]),
            ("PQfname", c, [p, i]), ("PQftype", ctypes.c_uint, [p, i]), ("PQgetvalue", c, [p, i, i]),
            ("PQgetisnull", i, [p, i, i])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes


class Rows(list):
    """A statement's rows, read like a cursor's (``fetchone``, ``fetchall``, iteration)."""

    def fetchone(self) -> dict[str, Any] | None:
        return self[0] if self else None

    def fetchall(self) -> list[dict[str, Any]]:
        return list(self)


class Connection:
    """One libpq connection; ``execute`` takes ``%s`` placeholders (as psycopg does) and returns the rows."""

    def __init__(self, url: str) -> None:
        self.lib = load()
        uri = url.replace("postgresql+psycopg://", "postgresql://", 1)
        params = {"dbname": uri, "connect_timeout": "10",
                  "options": "-c default_transaction_read_only=on -c timezone=UTC"}
        keys = (ctypes.c_char_p * (len(params) + 1))(*[k.encode() for k in params], None)
        values = (ctypes.c_char_p * (len(params) + 1))(*[v.encode() for v in params.values()], None)
        self.conn = self.lib.PQconnectdbParams(keys, values, 1)  # 1: dbname is a URI, expanded
        if not self.conn or self.lib.PQstatus(self.conn) != _CONNECTION_OK:
            message = self.lib.PQerrorMessage(self.conn).decode(errors="replace").strip() if self.conn else "no memory"
            self.close()
            raise LibpqError(message)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        numbered, n = [], 0
        for part in sql.split("%s"):
            numbered.append(part)
            n += 1
            numbered.append(f"${n}")
        text = "".join(numbered[:-1])
        values = (ctypes.c_char_p * max(1, len(params)))(*[None if v is None else _param(v) for v in params])
        result = self.lib.PQexecParams(self.conn, text.encode(), len(params), None, values, None, None, 0)
        try:
            if not result or self.lib.PQresultStatus(result) not in _OK:
                raise LibpqError((self.lib.PQresultErrorMessage(result) if result else
                                  self.lib.PQerrorMessage(self.conn)).decode(errors="replace").strip())
            return self._rows(result)
        finally:
            if result:
                self.lib.PQclear(result)

    def _rows(self, result: int) -> Rows:
        lib = self.lib
        fields = [(lib.PQfname(result, j).decode(), lib.PQftype(result, j)) for j in range(lib.PQnfields(result))]
        rows = Rows()
        for i in range(lib.PQntuples(result)):
            rows.append({name: None if lib.PQgetisnull(result, i, j) else _value(lib.PQgetvalue(result, i, j), oid)
                         for j, (name, oid) in enumerate(fields)})
        return rows

    def close(self) -> None:
        if self.conn:
            self.lib.PQfinish(self.conn)
            self.conn = None


def _param(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode()


def _value(raw: bytes, oid: int) -> Any:
    text = raw.decode()
    if oid == _BOOL:
        return text == "t"
    if oid in _INTS:
        return int(text)
    if oid in _FLOATS:
        return float(text)
    if oid in _JSON:
        return json.loads(text)
    if oid in _TIMES:
        return datetime.fromisoformat(text)
    return text
