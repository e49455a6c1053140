"""Path globs as people write them in policies: gitignore semantics (by pathspec).

Owns ``matching``: ``*`` and ``?`` stay within a path segment, ``**`` crosses segments, a pattern without
``/`` matches at any depth, one with ``/`` from the root, and a pattern covers what lies below a matching
directory (``tests/**`` covers ``tests`` itself, as when the job deleted the whole directory).

Must never: touch the filesystem; it judges path strings only.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import pathspec


@lru_cache(maxsize=1024)
def _spec(pattern: str) -> pathspec.PathSpec:
    return pathspec.PathSpec.from_lines("gitignore", [pattern])


def matching(path: str, patterns: Iterable[str]) -> list[str]:
    """The patterns that match ``path`` (a file or a directory, relative, with ``/`` separators)."""
    return [p for p in patterns
            if p.strip() and (_spec(p.strip()).match_file(path) or _spec(p.strip()).match_file(path + "/"))]
