"""Reading what a job or a person wrote: a parse that fails is a ``ValueError``, whatever the input does.

Owns ``load_json``: JSON from a spool file, a stream line, a transcript or a report, where deep nesting
(``RecursionError``), a parse larger than memory allows (``MemoryError``), bytes that are not UTF-8 and
plain syntax errors all come out as one ``Unparsable`` (a ``ValueError``), so a reader's ``except
ValueError`` is its whole boundary and no input can throw past it into a serving loop. With ``budget``, a
document whose parse could need more memory than that (``strict_json.estimate``: ``[{},{},...]`` costs 25
times its size) is ``Unparsable`` before the parse starts, so what a job wrote never sizes the executor.

Must never: return a partial result, let an exception other than ``Unparsable`` escape, or start a parse
whose estimate is over its budget.
"""

from __future__ import annotations

import json
from typing import Any


class Unparsable(ValueError):
    """The input is not a JSON document the executor can read; the message says why."""


def load_json(raw: bytes | str, budget: int | None = None) -> Any:
    """``raw`` parsed as JSON; ``Unparsable`` for anything that is not (never another exception), and for a
    document whose parse could need more than ``budget`` bytes of memory."""
    if budget is not None:
        from .sandbox.strict_json import estimate  # the one estimate of a parse's memory (measured there)

        needs = estimate(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
        if needs > budget:
            raise Unparsable(f"its parse could need {needs} bytes of memory, more than the {budget} allowed")
    try:
        return json.loads(raw)
    except RecursionError:
        raise Unparsable("nested too deeply to be read") from None
    except MemoryError:
        raise Unparsable("too large to be read in memory") from None
    except UnicodeDecodeError as exc:
        raise Unparsable(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise Unparsable(f"not valid JSON ({exc})") from None
