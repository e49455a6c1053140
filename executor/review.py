"""Review: which jobs wait for a person after their tests passed, what that person sees, and approve/reject.

Owns the review triggers (the policy's ``review`` mode, ``review_paths`` and ``protected_paths`` globs,
``review_max_changed_lines``, and the model's own ``REVIEW: <reason>`` line), the diff of a kept change
against the repository as it is now, and the two decisions. A job in ``awaiting_review`` holds nothing
but its upper dir (``$EXECUTOR_HOME/jobs/<id>/upper``, no overlay mounted, no container): approving
applies it with ``commit.apply_change`` after ``commit.check_conflicts`` against the moment the job
started, exactly as the pipeline commits; rejecting removes it. Every decision claims the job through
``Store.transition`` first, so two reviewers (the CLI and the web page, two processes) cannot both win.

Must never: apply anything while the repository conflicts with the change, apply other paths than the
ones approved, or touch the repository on reject.
"""

from __future__ import annotations

import difflib
import getpass
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .commit import Change, apply_change, check_conflicts, remove_tree, scan_upper
from .errors import Conflict, IllegalTransition, ReviewError, UnsafePath
from .policy import Policy
from .settings import Settings
from .store import Job, Status, Store, aware, utcnow

log = logging.getLogger(__name__)

#: Appended to the agent's system prompt when the policy's review is not ``never``.
REVIEW_INSTRUCTION = (
    "A person can review your change before it is committed. If you are unsure your change is right, or it "
    "is sensitive (security, credentials, data migrations, deployment or CI configuration, deleting data, "
    "changing the tests themselves), end your final message with one line of the form\n"
    "REVIEW: <one-sentence reason>\n"
    "Your change then waits for that person. Otherwise do not write such a line."
)

_REVIEW_LINE = re.compile(r"^[\s>*_`#-]*REVIEW\s*:[\s*_`]*(?P<reason>.*?)[\s*_`]*$")

#: A file larger than this is summarised (size and line count), not diffed line by line.
MAX_DIFF_BYTES = 2 * 1024 * 1024
#: How many files below a deleted or replaced directory are looked at for the summary.
MAX_WALK = 10_000


# --------------------------------------------------------------------------------------------
# triggers


def model_review_line(final_text: str | None) -> str | None:
    """The reason of the last ``REVIEW: <reason>`` line of the agent's final message, if any."""
    found = None
    for line in (final_text or "").splitlines():
        match = _REVIEW_LINE.match(line)
        if match:
            found = match.group("reason").strip() or "the model asked for a review without saying why"
    return found


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A gitignore-like glob: ``*`` and ``?`` stay within a path component, ``**`` crosses them, a pattern
    without ``/`` matches at any depth, one with ``/`` from the repository root."""
    pat = pattern.strip().lstrip("/").rstrip("/")
    anchored = "/" in pat
    out, i = [], 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == len(pat):
            out.append("(?:/.*)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < len(pat) and pat[j] in "!^":
                j += 1
            if j < len(pat) and pat[j] == "]":
                j += 1
            end = pat.find("]", j)
            if end == -1:
                out.append(re.escape(c))
                i += 1
                continue
            body = pat[i + 1:end]
            if body[0] in "!^":
                body = "^/" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    body = "".join(out)
    return re.compile(body if anchored else "(?:.*/)?" + body)


def matching(path: str, patterns: Iterable[str]) -> list[str]:
    """The patterns that match ``path`` or one of its parent directories."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return [p for p in patterns if p.strip() and any(_glob_regex(p).fullmatch(c) for c in candidates)]


def _listed(paths: list[str], limit: int = 10) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def review_reasons(policy: Policy, change: Change, final_text: str | None,
                   changed_lines: int | None = None) -> list[dict]:
    """Why a person must look at this (tested) change before it is committed; empty: commit it.

    ``changed_lines`` is needed only when the policy sets ``review_max_changed_lines``.
    """
    if policy.review == "never" or not change.changed_files:
        return []  # nothing would be applied: nothing to review
    reasons: list[dict] = []
    if policy.review == "always":
        reasons.append({"trigger": "always", "message": "the policy reviews every change (review = always)"})
    paths = change.changed_files
    for trigger, patterns, what in (
        ("review_paths", policy.review_paths, "changes paths that need a person"),
        ("protected_paths", policy.protected_paths, "changes the tests it is judged by (protected paths)"),
    ):
        hits = [p for p in paths if matching(p, patterns)]
        if hits:
            used = sorted({g for p in hits for g in matching(p, patterns)})
            reasons.append({"trigger": trigger, "paths": hits,
                            "message": f"{what} ({', '.join(used)}): {_listed(hits)}"})
    limit = policy.review_max_changed_lines
    if limit is not None and changed_lines is not None and changed_lines > limit:
        reasons.append({"trigger": "changed_lines", "lines": changed_lines,
                        "message": f"{changed_lines} changed lines, more than review_max_changed_lines ({limit})"})
    asked = model_review_line(final_text)
    if asked is not None:
        reasons.append({"trigger": "model", "message": f"the model asked for a review: {asked}"})
    return reasons


def reason_text(reasons: list[dict] | None) -> str:
    return "; ".join(str(r.get("message", r)) if isinstance(r, dict) else str(r) for r in reasons or [])


# --------------------------------------------------------------------------------------------
# diff


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


def _lstat_in(root: Path, rel: str) -> os.stat_result | None:
    """``lstat`` of ``root/rel``, or None when it, or a parent that is not a real directory, is missing."""
    parts = rel.split("/")
    current = root
    for depth, name in enumerate(parts):
        current = current / name
        try:
            st = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if depth < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None  # a symlink or file where a directory would be: not that path
    return st


def _read(path: Path, limit: int = MAX_DIFF_BYTES) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(1 << 20, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _text(data: bytes | None) -> str | None:
    if data is None or b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _count_lines(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        count, last = 0, b"\n"
        while chunk := os.read(fd, 1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
        return count + (last != b"\n")
    finally:
        os.close(fd)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _lines(text: str | None) -> int:
    return len(text.splitlines()) if text else 0


def _walk_files(root: Path, rel: str) -> list[str]:
    """Relative paths of every non-directory entry below ``root/rel`` (never following symlinks)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root / rel):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.append(str(Path(dirpath, name).relative_to(root)))
            if len(found) >= MAX_WALK:
                return found
    return found


def _removed_lines(root: Path, paths: list[str]) -> int:
    total = 0
    for rel in paths:
        st = _lstat_in(root, rel)
        if st is not None and stat.S_ISREG(st.st_mode):
            total += _count_lines(root / rel)
    return total


def _file_diff(path: str, upper: Path, repo: Path, mode: int) -> FileDiff:
    old_st = _lstat_in(repo, path)
    new_path = upper / path
    new_size = os.lstat(new_path).st_size
    if old_st is not None and stat.S_ISDIR(old_st.st_mode):
        gone = _walk_files(repo, path)
        new = _text(_read(new_path))
        return FileDiff(path, "type_changed", f"directory replaced by a file (removes {len(gone)} entries)",
                        None, new, _lines(new) if new is not None else 1, _removed_lines(repo, gone), gone)
    if old_st is not None and stat.S_ISLNK(old_st.st_mode):
        new = _text(_read(new_path))
        return FileDiff(path, "type_changed", f"symlink (-> {os.readlink(repo / path)}) replaced by a file",
                        None, new, _lines(new) if new is not None else 1, 1)
    old_regular = old_st is not None and stat.S_ISREG(old_st.st_mode)
    if new_size > MAX_DIFF_BYTES or (old_regular and old_st.st_size > MAX_DIFF_BYTES):
        new_lines = _count_lines(new_path)
        old_lines = _count_lines(repo / path) if old_regular else 0
        before = f"{old_st.st_size} -> " if old_regular else ""
        return FileDiff(path, "modified" if old_regular else "added",
                        f"large file ({before}{new_size} bytes): not shown line by line",
                        added=new_lines, removed=old_lines)
    new_data = _read(new_path)
    old_data = _read(repo / path) if old_regular else None
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


def diff_change(change: Change, upper: Path, repo: Path) -> list[FileDiff]:
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
            target = os.readlink(upper / path)
            old_st = _lstat_in(repo, path)
            if old_st is not None and stat.S_ISLNK(old_st.st_mode):
                before = os.readlink(repo / path)
                note = f"symlink -> {target} (was -> {before})" if before != target else f"symlink -> {target}"
                diffs.append(FileDiff(path, "symlink", note, added=int(before != target), removed=int(before != target)))
            elif old_st is not None and stat.S_ISREG(old_st.st_mode):
                old = _text(_read(repo / path))
                diffs.append(FileDiff(path, "type_changed", f"file replaced by a symlink -> {target}", old, None,
                                      1, _lines(old) if old is not None else 1))
            else:
                diffs.append(FileDiff(path, "symlink", f"new symlink -> {target}", added=1))
        elif entry.kind == "delete":
            old_st = _lstat_in(repo, path)
            if old_st is None:
                diffs.append(FileDiff(path, "deleted", "deleted (already absent from the repository)"))
            elif stat.S_ISDIR(old_st.st_mode):
                gone = _walk_files(repo, path)
                diffs.append(FileDiff(path, "dir_deleted", f"directory deleted with its {len(gone)} entries",
                                      removed=_removed_lines(repo, gone), removed_paths=gone))
            elif stat.S_ISLNK(old_st.st_mode):
                diffs.append(FileDiff(path, "deleted", f"symlink deleted (was -> {os.readlink(repo / path)})",
                                      removed=1))
            else:
                old = _text(_read(repo / path)) if old_st.st_size <= MAX_DIFF_BYTES else None
                if old is None:
                    diffs.append(FileDiff(path, "deleted", f"deleted ({old_st.st_size} bytes, not shown)",
                                          removed=_count_lines(repo / path) or 1))
                else:
                    diffs.append(FileDiff(path, "deleted", f"deleted, {_plural(_lines(old), 'line')}", old, None, 0,
                                          _lines(old)))
        elif entry.kind == "opaque_dir":
            old_st = _lstat_in(repo, path)
            if old_st is None or not stat.S_ISDIR(old_st.st_mode):
                continue  # a new directory: its contents are listed as their own entries
            gone = [p for p in _walk_files(repo, path) if p not in upper_paths]
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


# --------------------------------------------------------------------------------------------
# a kept change and its parts


def select(change: Change, paths: Iterable[str] | None) -> Change:
    """The part of ``change`` at ``paths`` (a changed path, or a directory: everything changed below it),
    with the parent directories it needs; a replaced parent directory not chosen itself is only made sure
    to exist (its old contents stay). ``None`` or empty: the whole change."""
    wanted = sorted({p.strip().strip("/") for p in paths or [] if p.strip().strip("/")})
    if not wanted:
        return change
    changed = [e for e in change.entries if e.kind != "dir"]

    def chosen(path: str) -> bool:
        return any(path == w or path.startswith(w + "/") for w in wanted)

    unknown = [w for w in wanted if not any(e.path == w or e.path.startswith(w + "/") for e in changed)]
    if unknown:
        raise ReviewError(f"not changed by the job: {', '.join(unknown)}; its changed paths are "
                          f"{_listed([e.path for e in changed], 30)}", paths=unknown)
    picked = {e.path for e in changed if chosen(e.path)}
    parents = {"/".join(p.split("/")[:n]) for p in picked for n in range(1, p.count("/") + 1)}
    entries = []
    for e in change.entries:
        if e.path in picked:
            entries.append(e)
        elif e.path in parents:
            entries.append(e._replace(kind="dir") if e.kind == "opaque_dir" else e)
    return Change(entries=entries, ignored_git=change.ignored_git, refused=change.refused)


def _workspace(settings: Settings, job: Job):
    from .pipeline import workspace_for  # pipeline imports this module

    return workspace_for(settings, job, job.attempts)


@dataclass
class Pending:
    """A job awaiting review and everything a reviewer needs about it."""

    job: Job
    reasons: list[dict]
    diffs: list[FileDiff]
    refused: list[str]
    missing: bool  # the kept change is gone (removed by hand): only reject makes sense

    @property
    def changed_lines(self) -> int:
        return changed_lines(self.diffs)


def pending(store: Store, settings: Settings, job_id: str) -> Pending:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    ws = _workspace(settings, job)
    if not ws.upper.is_dir():
        return Pending(job, job.review_reasons or [], [], [], True)
    change = scan_upper(ws.upper)
    return Pending(job, job.review_reasons or [], diff_change(change, ws.upper, ws.repo),
                   [f"{r.path} ({r.reason})" for r in change.refused], False)


def queue(store: Store) -> list[Job]:
    """Jobs awaiting review, the longest waiting first."""
    jobs = store.jobs([Status.awaiting_review])
    return sorted(jobs, key=lambda j: (aware(j.review_since or j.created_at), j.id))


# --------------------------------------------------------------------------------------------
# decisions


def reviewer() -> str:
    """Who runs this process (the person behind sudo when there is one)."""
    name = os.environ.get("SUDO_USER")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _awaiting(store: Store, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise ReviewError(f"no job {job_id!r}")
    if job.status != Status.awaiting_review:
        raise ReviewError(f"job {job_id} is {job.status.value}, not awaiting review"
                          + (f" ({job.reason})" if job.reason else ""))
    return job


def _claim(store: Store, job: Job, new: Status, **fields) -> Job:
    try:
        return store.transition(job.id, Status.awaiting_review, new, **fields)
    except IllegalTransition as exc:
        current = store.get(job.id)
        raise ReviewError(f"job {job.id} was decided meanwhile: it is "
                          f"{current.status.value if current else 'gone'} ({exc})") from None


def _record(store: Store, job: Job, kind: str, data: dict) -> None:
    store.add_event(job, job.attempts, kind, data)


def approve(store: Store, settings: Settings, job_id: str, files: Iterable[str] | None = None,
            note: str | None = None, by: str | None = None) -> Job:
    """Apply the job's tested change (or the part at ``files``) to the repository and settle it.

    Raises ``Conflict`` (the job fails, nothing applied, the change kept for inspection) when a path it
    would apply changed in the repository since the job started; ``ReviewError`` when it cannot be done.
    """
    job = _awaiting(store, job_id)
    by = by or reviewer()
    chosen = sorted({p.strip().strip("/") for p in files or [] if p.strip().strip("/")}) or None
    ws = _workspace(settings, job)
    if not ws.upper.is_dir():
        raise ReviewError(f"the kept change of job {job.id} is gone ({ws.upper}); reject the job")
    change = select(scan_upper(ws.upper), chosen)
    if change.refused:
        raise ReviewError("the change holds entries that are never applied: " +
                          ", ".join(f"{r.path} ({r.reason})" for r in change.refused))
    now = utcnow()
    decision = {"action": "approve", "by": by, "at": now.isoformat(), "note": note, "files": chosen}
    conflicts = check_conflicts(change, ws.repo, job.start_ns or 0)
    if conflicts:
        err = Conflict(conflicts)
        job = _claim(store, job, Status.failed, reason="conflict", error=str(err), reviewed_by=by,
                     reviewed_at=now, review_note=note)
        _record(store, job, "review", {**decision, "outcome": "conflict", "paths": conflicts})
        _record(store, job, "state", {"status": "failed", "reason": "conflict", "error": str(err)})
        log.warning("review approve met a conflict", extra={"action": "review", "job": job.id, "paths": conflicts})
        raise err
    job = _claim(store, job, Status.committing, changed_files=change.changed_files, review_files=chosen,
                 reviewed_by=by, reviewed_at=now, review_note=note)
    _record(store, job, "review", {**decision, "outcome": "approved", "applied": change.changed_files})
    _record(store, job, "state", {"status": "committing", "changed_files": change.changed_files,
                                  "ignored_git": change.ignored_git})
    try:
        apply_change(change, ws.upper, ws.repo, ws.uid, ws.gid)
    except (UnsafePath, OSError) as exc:
        error = f"the change could not be applied: {exc}"
        job = store.transition(job.id, Status.committing, Status.failed, reason="commit_failed", error=error)
        _record(store, job, "state", {"status": "failed", "reason": "commit_failed", "error": error})
        raise ReviewError(error) from None
    # The upper dir goes only after a complete apply (a committing job without one is committed).
    remove_tree(ws.root)
    job = store.transition(job.id, Status.committing, Status.succeeded, reason="committed", error=None)
    _record(store, job, "state", {"status": "succeeded", "reason": "committed", "error": None})
    log.info("review approved and committed", extra={"action": "review", "job": job.id, "by": by,
                                                     "files": len(change.changed_files)})
    return job


def reject(store: Store, settings: Settings, job_id: str, note: str | None = None,
           by: str | None = None) -> Job:
    """Roll the job back: its kept change is removed, the repository is not touched."""
    job = _awaiting(store, job_id)
    by = by or reviewer()
    now = utcnow()
    error = f"rejected in review by {by}" + (f": {note}" if note else "")
    job = _claim(store, job, Status.rolled_back, reason="rejected", error=error, reviewed_by=by,
                 reviewed_at=now, review_note=note)
    _record(store, job, "review", {"action": "reject", "by": by, "at": now.isoformat(), "note": note,
                                   "outcome": "rejected"})
    _record(store, job, "state", {"status": "rolled_back", "reason": "rejected", "error": error})
    root = _workspace(settings, job).root
    if root.exists():
        remove_tree(root)
    log.info("review rejected", extra={"action": "review", "job": job.id, "by": by})
    return job


# --------------------------------------------------------------------------------------------
# numbers


def review_stats(jobs: Iterable[Job]) -> dict:
    """The review share (of the jobs whose tests passed, how many waited for a person) and the mean time
    a job waited for its decision."""
    passed = reviewed = waiting = 0
    waits: list[float] = []
    for job in jobs:
        if job.review_since is not None:
            reviewed += 1
            passed += 1
            if job.reviewed_at is not None:
                waits.append((aware(job.reviewed_at) - aware(job.review_since)).total_seconds())
            elif job.status == Status.awaiting_review:
                waiting += 1
        elif job.status == Status.succeeded:
            passed += 1
    return {
        "tests_passed": passed,
        "reviewed": reviewed,
        "awaiting_review": waiting,
        "review_share": round(reviewed / passed, 4) if passed else None,
        "decided": len(waits),
        "mean_review_wait_seconds": round(sum(waits) / len(waits), 1) if waits else None,
    }


def since(moment: datetime | None) -> float | None:
    """Seconds since ``moment`` (None if unknown)."""
    return (utcnow() - aware(moment)).total_seconds() if moment is not None else None
