"""Durable state: the status machine, the tables, and the ``Store`` that is the only way to them.

The tables and the ``Store`` load on first use (SQLAlchemy takes a fifth of a second to import): a command
that only reads the serving loop's snapshot never pays for it.
"""


from ..lazy import loader
from .status import TERMINAL, TRANSITIONS, Status

_LAZY = {"ApiRequest": "models", "Attempt": "models", "Compaction": "models", "Event": "models",
         "Heartbeat": "models", "Host": "models", "Job": "models", "RateLimitEvent": "models",
         "RunnerState": "models", "Store": "store"}

__all__ = ["Status", "TERMINAL", "TRANSITIONS", *_LAZY]

__getattr__ = loader(__name__, _LAZY, globals())
