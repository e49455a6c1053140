"""What a reviewer sees: every path of a kept change as a diff against the repository as it is now.

Owns ``FileDiff`` (the kind of change, a one-line note, the text on both sides, added and removed line
counts, hunks with line numbers) and ``diff_change`` over a whole ``Change``, plus the plain unified text
the CLI prints.

Must never: write anything, or follow a symlink the job or the person planted when reading either side.
"""

from __future__ import annotations

import difflib
import stat
from dataclasses import dataclass, field

from ..transaction.tree import Tree
from ..transaction.upper import Change

#: A file larger than this is summarised (size and line count), not diffed line by line.
MAX_DIFF_BYTES = 2 * 1024 * 1024
#: How many files below a deleted or replaced directory are looked at for the summary.
MAX_WALK = 10_000


# --------------------------------------------------------------------------------------------


@dataclass
class FileDiff:
    """One changed path as a reviewer sees it, against the repository as it is now."""

    path: str
    kind: str  # added | modified | deleted | mode | binary | symlink | type_changed | dir_deleted | dir_replaced
    note: str  # one line for people: "deleted", "binary file, 10 -> 12 bytes", ...
    old: str | None = None  # text shown on the left (None: nothing there, or not text)
    new: str | None = None
    added: int = 0
    removed: int = 0
    removed_paths: list[str] = field(default_factory=list)  # below a deleted or replaced directory

    def unified(self) -> str:
        """A unified diff (``diff -u`` style, ``a/`` and ``b/`` prefixes); empty when there is no text."""
        if self.old is None and self.new is None:
            return ""
        a = (self.old or "").splitlines(keepends=True)
        b = (self.new or "").splitlines(keepends=True)
        lines = difflib.unified_diff(a, b, f"a/{self.path}" if self.old is not None else "/dev/null",
                                     f"b/{self.path}" if self.new is not None else "/dev/null")
        return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in lines)

    def hunks(self, context: int = 3) -> list[dict]:
        """The diff's hunks with line numbers: ``{"header", "lines": [(tag, old_no, new_no, text)]}``,
        tag ``" "``, ``"-"`` or ``"+"`` (numbers are 1-based indexes into old/new lines, None if absent)."""
        if self.old is None and self.new is None:
            return []
        a = (self.old or "").splitlines()
        b = (self.new or "").splitlines()
        out = []
        for group in difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context):
            i1, j1 = group[0][1], group[0][3]
            i2, j2 = group[-1][2], group[-1][4]
            rows = []
            for tag, a1, a2, b1, b2 in group:
                if tag == "equal":
                    rows += [(" ", a1 + k + 1, b1 + k + 1, a[a1 + k]) for k in range(a2 - a1)]
                    continue
                rows += [("-", a1 + k + 1, None, a[a1 + k]) for k in range(a2 - a1)]
                rows += [("+", None, b1 + k + 1, b[b1 + k]) for k in range(b2 - b1)]
            out.append({"header": f"@@ -{i1 + 1 if i2 > i1 else i1},{i2 - i1} +{j1 + 1 if j2 > j1 else j1},"
                                  f"{j2 - j1} @@", "lines": rows})
        return out


def _text(data: bytes | None) -> str | None:
    if data is None or b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _lines(text: str | None) -> int:
    return len(text.splitlines()) if text else 0


def _removed_lines(root: Tree, paths: list[str]) -> int:
    total = 0
    for rel in paths:
        st = root.lstat(rel)
        if st is not None and stat.S_ISREG(st.st_mode):
            total += root.count_lines(rel)
    return total


def _file_diff(path: str, upper: Tree, repo: Tree, mode: int) -> FileDiff:
    old_st = repo.lstat(path)
    new_size = upper.lstat(path).st_size
    if old_st is not None and stat.S_ISDIR(old_st.st_mode):
        gone = repo.files_below(path, MAX_WALK)
        new = _text(upper.read(path, MAX_DIFF_BYTES))
        return FileDiff(path, "type_changed", f"directory replaced by a file (removes {len(gone)} entries)",
                        None, new, _lines(new) if new is not None else 1, _removed_lines(repo, gone), gone)
    if old_st is not None and stat.S_ISLNK(old_st.st_mode):
        new = _text(upper.read(path, MAX_DIFF_BYTES))
        return FileDiff(path, "type_changed", f"symlink (-> {repo.readlink(path)}) replaced by a file",
                        None, new, _lines(new) if new is not None else 1, 1)
    old_regular = old_st is not None and stat.S_ISREG(old_st.st_mode)
    if new_size > MAX_DIFF_BYTES or (old_regular and old_st.st_size > MAX_DIFF_BYTES):
        new_lines = upper.count_lines(path)
        old_lines = repo.count_lines(path) if old_regular else 0
        before = f"{old_st.st_size} -> " if old_regular else ""
        return FileDiff(path, "modified" if old_regular else "added",
                        f"large file ({before}{new_size} bytes): not shown line by line",
                        added=new_lines, removed=old_lines)
    new_data = upper.read(path, MAX_DIFF_BYTES)
    old_data = repo.read(path, MAX_DIFF_BYTES) if old_regular else None
    new, old = _text(new_data), _text(old_data)
    old_mode = stat.S_IMODE(old_st.st_mode) if old_regular else None
    mode_note = f"mode {old_mode:o} -> {mode & 0o777:o}" if old_mode is not None and old_mode != mode & 0o777 else ""
    if (new_data is not None and new is None) or (old_data is not None and old is None):
        before = f"{len(old_data)} -> " if old_data is not None else ""
        what = "binary file changed" if old_regular else "binary file added"
        note = f"{what} ({before}{len(new_data or b'')} bytes)" + (f", {mode_note}" if mode_note else "")
        return FileDiff(path, "binary", note, added=1, removed=1 if old_regular else 0)
    if not old_regular:
        return FileDiff(path, "added", f"new file, {_plural(_lines(new), 'line')}", None, new or "", _lines(new), 0)
    a, b = (old or "").splitlines(), (new or "").splitlines()
    added = removed = 0
    for tag, a1, a2, b1, b2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += a2 - a1
            added += b2 - b1
    if old == new:
        note = mode_note or "unchanged content"
        return FileDiff(path, "mode" if mode_note else "modified", note, old, new, 0, 0)
    if added == removed == 0:  # only the final newline moved
        added = removed = 1
    note = f"modified, +{added} -{removed}" + (f", {mode_note}" if mode_note else "")
    return FileDiff(path, "modified", note, old, new, added, removed)


def diff_change(change: Change, upper: Tree, repo: Tree) -> list[FileDiff]:
    """Every changed path of ``change`` (read from ``upper``) against ``repo`` as it is now."""
    upper_paths = {e.path for e in change.entries}
    diffs: list[FileDiff] = []
    for entry in change.entries:
        path = entry.path
        if entry.kind == "dir":
            continue
        if entry.kind == "file":
            diffs.append(_file_diff(path, upper, repo, entry.mode))
        elif entry.kind == "symlink":
            target = upper.readlink(path)
            old_st = repo.lstat(path)
            if old_st is not None and stat.S_ISLNK(old_st.st_mode):
                before = repo.readlink(path)
                note = f"symlink -> {target} (was -> {before})" if before != target else f"symlink -> {target}"
                diffs.append(FileDiff(path, "symlink", note, added=int(before != target), removed=int(before != target)))
            elif old_st is not None and stat.S_ISREG(old_st.st_mode):
                old = _text(repo.read(path, MAX_DIFF_BYTES))
                diffs.append(FileDiff(path, "type_changed", f"file replaced by a symlink -> {target}", old, None,
                                      1, _lines(old) if old is not None else 1))
            else:
                diffs.append(FileDiff(path, "symlink", f"new symlink -> {target}", added=1))
        elif entry.kind == "delete":
            old_st = repo.lstat(path)
            if old_st is None:
                diffs.append(FileDiff(path, "deleted", "deleted (already absent from the repository)"))
            elif stat.S_ISDIR(old_st.st_mode):
                gone = repo.files_below(path, MAX_WALK)
                diffs.append(FileDiff(path, "dir_deleted", f"directory deleted with its {len(gone)} entries",
                                      removed=_removed_lines(repo, gone), removed_paths=gone))
            elif stat.S_ISLNK(old_st.st_mode):
                diffs.append(FileDiff(path, "deleted", f"symlink deleted (was -> {repo.readlink(path)})",
                                      removed=1))
            else:
                old = _text(repo.read(path, MAX_DIFF_BYTES)) if old_st.st_size <= MAX_DIFF_BYTES else None
                if old is None:
                    diffs.append(FileDiff(path, "deleted", f"deleted ({old_st.st_size} bytes, not shown)",
                                          removed=repo.count_lines(path) or 1))
                else:
                    diffs.append(FileDiff(path, "deleted", f"deleted, {_plural(_lines(old), 'line')}", old, None, 0,
                                          _lines(old)))
        elif entry.kind == "opaque_dir":
            old_st = repo.lstat(path)
            if old_st is None or not stat.S_ISDIR(old_st.st_mode):
                continue  # a new directory: its contents are listed as their own entries
            gone = [p for p in repo.files_below(path, MAX_WALK) if p not in upper_paths]
            note = (f"directory replaced: {len(gone)} entries of the old one are removed" if gone
                    else "directory replaced (every old entry is rewritten)")
            diffs.append(FileDiff(path, "dir_replaced", note, removed=_removed_lines(repo, gone), removed_paths=gone))
    return diffs


def changed_lines(diffs: list[FileDiff]) -> int:
    return sum(d.added + d.removed for d in diffs)


def render_unified(diffs: list[FileDiff]) -> str:
    """All diffs as text: each path's header (what happened) and its unified diff."""
    out = []
    for d in diffs:
        out.append(f"=== {d.path}: {d.note}\n")
        for gone in d.removed_paths[:50]:
            out.append(f"    removed: {gone}\n")
        if len(d.removed_paths) > 50:
            out.append(f"    ... and {len(d.removed_paths) - 50} more removed\n")
        out.append(d.unified())
    return "".join(out)
