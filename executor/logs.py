"""Structured logging: one record per state change, with a stable ``action`` key and the job, session,
runner and attempt as fields (values passed as arguments, never formatted into the message).

Owns the two output formats (``text`` for a terminal, ``json`` for collectors).

Must never: log a credential. Records carry only the fields code passes explicitly.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc).strftime("%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items() if v is not None)
        line = f"{ts} {record.levelname.lower():7} {record.getMessage()}" + (f"  {extra}" if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Alembic announces each plugin and migration step at INFO; the store logs one line per upgrade itself.
    for noisy in ("urllib3", "docker", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_state_log = logging.getLogger("executor.state")


def log_state(job: Any, status: Any, attempt: int, **fields: object) -> None:
    """The one record of a job's state change: ``action=state`` with the job, session, runner, attempt."""
    value = getattr(status, "value", status)
    _state_log.info("job %s", value, extra={"action": "state", "job": job.id, "session": job.session_id,
                                             "runner": job.runner, "attempt": attempt, "status": value, **fields})
