"""Names a package exports but imports on first use (PEP 562 ``__getattr__``): a command that never touches
a heavy dependency (SQLAlchemy, Starlette) never pays for importing it.

Must never: answer for a name the package does not export (that stays an ``AttributeError``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def loader(package: str, table: Mapping[str, str], namespace: dict) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: ``table`` maps each lazy name to its submodule; a loaded
    name is kept in ``namespace`` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{table[name]}", package), name)
        namespace[name] = value
        return value

    return __getattr__
