"""Path globs as people write them in policies: gitignore semantics (by pathspec).

Owns ``matching``: ``*`` and ``?`` stay within a path segment, ``**`` crosses segments, a pattern without
``/`` matches at any depth, one with ``/`` from the root, and a pattern covers what lies below a matching
directory (``tests/**`` covers ``tests`` itself, as when the job deleted the whole directory). And
``matching_files``: the same patterns judged on a file's own path only, so that a *directory* named like a
file pattern (``x.jsonl/``) covers nothing below it (what ``session_carry`` needs: it hands files on, never
trees by a name).

Must never: touch the filesystem; it judges path strings only.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import re

import pathspec


@lru_cache(maxsize=1024)
def _spec(pattern: str) -> pathspec.PathSpec:
    return pathspec.PathSpec.from_lines("gitignore", [pattern])


def matching(path: str, patterns: Iterable[str]) -> list[str]:
    """The patterns that match ``path`` (a file or a directory, relative, with ``/`` separators)."""
    return [p for p in patterns
            if p.strip() and (_spec(p.strip()).match_file(path) or _spec(p.strip()).match_file(path + "/"))]


#: How pathspec ends a pattern that also covers what lies below a matching directory.
_OR_BELOW = "(?:/|$)"


@lru_cache(maxsize=1024)
def _own_name(pattern: str) -> re.Pattern[str] | None:
    """The pattern as a regex that must match the whole path (None for a negation, which picks nothing)."""
    compiled = _spec(pattern).patterns[0]
    if not compiled.include or compiled.regex is None:
        return None
    regex = compiled.regex.pattern
    if regex.endswith(_OR_BELOW):
        regex = regex[: -len(_OR_BELOW)] + "$"
    return re.compile(regex)


def matching_files(path: str, patterns: Iterable[str]) -> list[str]:
    """The patterns that match ``path`` as a file, by its own path: ``*.jsonl`` matches ``a/x.jsonl`` but not
    ``a/x.jsonl/settings.json``; ``tests/**`` matches every file below ``tests/`` (it says so itself)."""
    found = []
    for p in patterns:
        regex = _own_name(p.strip()) if p.strip() else None
        if regex is not None and regex.match(path):
            found.append(p)
    return found
