"""Which of a job's new paths git would leave out of a commit: the ignore rules as the job left them.

Owns ``Ignored``: a path is judged by the ``.gitignore`` of every directory on its way as the job's view has
it (the job's own version when it wrote one; none when it deleted it or replaced a directory above it; the
repository's otherwise), over the repository's ``.git/info/exclude``, as git judges them: a deeper file
outranks a shallower one, the last matching line of a file wins, and nothing below an ignored directory
comes back. So the byproducts a job's own run leaves (``__pycache__/``, build output) land in the working
tree, as every file does, but never in a commit. The caller asks only about paths the commit's parent does
not track (a tracked path is never ignored).

Must never: follow a symlink (a ``.gitignore`` that is a link is no rule, as for git), read more than
``LIMIT`` of one file, or write anything.
"""

from __future__ import annotations

from pathspec import GitIgnoreSpec

from .tree import Tree
from .upper import Change

LIMIT = 1 << 20  # one ignore file: more is not a person's list of patterns


class Ignored:
    """``ignored(path)`` for the view ``upper`` (the job's layer, holding ``change``) over ``repo``."""

    def __init__(self, change: Change, upper: Tree, repo: Tree) -> None:
        self.entries = {e.path: e for e in change.entries}
        self.upper, self.repo = upper, repo
        self._specs: dict[str, GitIgnoreSpec | None] = {}
        self._dirs: dict[str, bool] = {}
        self._exclude = _spec(repo.read(".git/info/exclude", LIMIT))

    def __call__(self, path: str) -> bool:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if self._dir_ignored("/".join(parts[:depth])):
                return True
        return self._matches(path, is_dir=False)

    def _dir_ignored(self, path: str) -> bool:
        # Callers walk a path's directories from the top, so a directory's parents are judged before it.
        if path not in self._dirs:
            self._dirs[path] = self._matches(path, is_dir=True)
        return self._dirs[path]

    def _matches(self, path: str, is_dir: bool) -> bool:
        parts = path.split("/")
        found = False
        levels = [("", self._exclude)] + [("/".join(parts[:d]), self._spec_of("/".join(parts[:d])))
                                           for d in range(len(parts))]
        for base, spec in levels:  # shallow to deep: a deeper file's verdict is the one that stands
            if spec is None:
                continue
            rel = path[len(base) + 1:] if base else path
            result = spec.check_file(rel + "/" if is_dir else rel).include
            if result is not None:
                found = result
        return found

    def _spec_of(self, directory: str) -> GitIgnoreSpec | None:
        if directory not in self._specs:
            self._specs[directory] = _spec(self._read(f"{directory}/.gitignore" if directory else ".gitignore"))
        return self._specs[directory]

    def _read(self, rel: str) -> bytes | None:
        """The file at ``rel`` as the job's view has it."""
        entry = self.entries.get(rel)
        if entry is not None:
            return self.upper.read(rel, LIMIT) if entry.kind == "file" else None
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            above = self.entries.get("/".join(parts[:depth]))
            if above is not None and above.kind != "dir":  # replaced or gone: the repository's is hidden
                return None
        return self.repo.read(rel, LIMIT)


def _spec(content: bytes | None) -> GitIgnoreSpec | None:
    if not content:
        return None
    lines = content.decode("utf-8", "surrogateescape").splitlines()
    try:
        return GitIgnoreSpec.from_lines(lines)
    except Exception:  # noqa: BLE001 - a pattern pathspec cannot read: git would skip it; so is the file
        return GitIgnoreSpec.from_lines([line for line in lines if _readable(line)])


def _readable(line: str) -> bool:
    try:
        GitIgnoreSpec.from_lines([line])
        return True
    except Exception:  # noqa: BLE001
        return False
