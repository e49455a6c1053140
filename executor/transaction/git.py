"""Running git on a repository as its owner, so that nothing of the repository or of a job makes git run code.

Owns ``Git``: every git command the executor runs on a person's repository, each one run as the repository's
owner (never as root), from the repository's pinned directory fd, with a scrubbed environment (no system or
global configuration, no inherited ``GIT_*``, an empty ``HOME``, no prompt, literal pathspecs, no replace
objects) and command-line settings that outrank anything the repository's own configuration (or a file it
includes, which a job may have written) says: hooks point nowhere (a ``core.hooksPath`` naming a tracked
folder such as ``.husky/`` runs nothing), no fsmonitor command, no pager, editor, askpass, credential helper
or ssh command, no signing program, no transport (a lazy fetch could run one), and
``core.sharedRepository`` as the repository's own config file has it (an included file cannot widen the
modes of what git writes). Content is only ever handed to git as bytes (``fast-import``) and read back as
bytes (``cat-file --batch``), and every command's working tree is an empty directory of its own
(``empty_worktree``): writing an index makes git re-read a "racily clean" entry's file through the clean
filter its ``.gitattributes`` names, so with the person's tree in view a job's ``.gitattributes`` and an
included config could run a command (tested). No filter, textconv or attribute of the working tree is ever
read. Also owns the plumbing steps built on that (a temporary index, ``read-tree``, ``update-index
--index-info``, ``write-tree``, ``commit-tree``, a compare-and-swap ``update-ref``) and the repository's HEAD
as a landing sees it.

Must never: run git as root, let git see the person's working tree, pass a path git could take for pathspec
magic, or let a command's output grow without a bound it sets (every call has a timeout).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import GitError
from .safefs import lstat_at

#: Settings given on the command line: they outrank the system, global, repository and included files.
SAFE_CONFIG = (
    "core.hooksPath=/dev/null", "core.fsmonitor=false", "core.untrackedCache=false", "core.pager=cat",
    "core.editor=:", "core.askPass=", "core.sshCommand=/nonexistent", "credential.helper=",
    "commit.gpgSign=false", "tag.gpgSign=false", "gpg.program=/nonexistent", "gpg.ssh.program=/nonexistent",
    "gpg.x509.program=/nonexistent", "core.alternateRefsCommand=", "protocol.allow=never", "gc.auto=0",
    "maintenance.auto=false", "core.useReplaceRefs=false", "index.sparse=false", "core.sparseCheckout=false",
    "submodule.recurse=false", "core.fsync=committed,index", "core.fsyncObjectFiles=true",
    "i18n.commitEncoding=UTF-8", "color.ui=never", "diff.renames=false",
    # a named protocol's own setting outranks protocol.allow: each one a config (an included file) could
    # allow is closed by name (a lazy fetch of a promisor remote would otherwise run ext:: commands)
    *(f"protocol.{name}.allow=never" for name in ("file", "git", "ssh", "http", "https", "ftp", "ftps", "ext")),
)
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_SYSTEM": "/dev/null", "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_ATTR_NOSYSTEM": "1", "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0",
    "GIT_TERMINAL_PROMPT": "0", "GIT_PAGER": "cat", "GIT_EDITOR": ":", "GIT_ASKPASS": "/nonexistent",
    "GIT_LITERAL_PATHSPECS": "1", "GIT_NO_REPLACE_OBJECTS": "1", "GIT_NO_LAZY_FETCH": "1",
}
#: What git's state files say is underway: a landing on the current branch waits until it is finished.
UNDERWAY = (("MERGE_HEAD", "a merge"), ("rebase-merge", "a rebase"), ("rebase-apply", "a rebase or am"),
            ("CHERRY_PICK_HEAD", "a cherry-pick"), ("REVERT_HEAD", "a revert"))
TIMEOUT = 300.0
#: How often an index another git holds locked is tried again, and how long apart (seconds).
LOCK_TRIES, LOCK_WAIT = 20, 0.5
FILE_MODES = ("100644", "100755", "120000")
_SHARED = re.compile(r"^(false|true|umask|group|all|world|everybody|0[0-7]{3})$")
_empty: list[str] = []  # the empty working tree every command is given (made once, root's, 0555)


def empty_worktree() -> str:
    """An empty directory no one but its maker can write: git's working tree for every command here. Writing
    the index makes git look again at a "racily clean" entry's file, through the clean filter the file's
    ``.gitattributes`` names (a job can write both); with this as the working tree there is no file to read,
    so whatever a command would look at in a working tree, nothing of the person's is read."""
    if not _empty or not os.path.isdir(_empty[0]):
        path = tempfile.mkdtemp(prefix="executor-git-worktree-")
        os.chmod(path, 0o555)
        atexit.register(lambda: os.path.isdir(path) and os.rmdir(path))
        _empty[:] = [path]
    return _empty[0]


@dataclass(frozen=True)
class Head:
    """Where a repository's HEAD is: the branch it names (None: detached), its commit (None: an unborn
    branch), what is underway (a merge, a rebase; None: nothing) and the object format (sha1, sha256)."""

    ref: str | None
    commit: str | None
    underway: str | None
    object_format: str

    @property
    def branch(self) -> str | None:
        return self.ref.removeprefix("refs/heads/") if self.ref else None


class Git:
    """git on the repository open at ``repo_fd`` (the caller keeps it open), as ``uid``:``gid``."""

    def __init__(self, repo_fd: int, uid: int, gid: int) -> None:
        self.repo_fd, self.uid, self.gid = repo_fd, uid, gid
        self._format: str | None = None
        self._shared: str | None = None

    @property
    def proc(self) -> str:
        """The repository's directory as git reaches it: through the fd (never its path, which may change)."""
        return f"/proc/self/fd/{self.repo_fd}"

    def _shared_setting(self) -> str:
        """``core.sharedRepository`` as the repository's own config file says it, includes not read (an
        included file may be one a job wrote: it must not make the objects git writes world-writable)."""
        if self._shared is None:
            self._shared = "false"
            try:
                done = subprocess.run(["git", "config", "--file", f"{self.proc}/.git/config", "--get",
                                       "core.sharedRepository"],
                                      **self._popen_args([], None, bare=True), capture_output=True, timeout=30,
                                      check=False)
            except (OSError, subprocess.SubprocessError):
                return self._shared
            value = done.stdout.decode("ascii", "replace").strip().lower()
            if done.returncode == 0 and _SHARED.match(value):
                self._shared = value
        return self._shared

    # -- running ---------------------------------------------------------------------------------------

    def _popen_args(self, args: Iterable[str], env: dict | None, bare: bool = False) -> dict:
        as_owner = {"user": self.uid, "group": self.gid, "extra_groups": []} if os.geteuid() == 0 else {}
        if os.geteuid() == 0 and self.uid == 0:
            raise GitError("refusing to run git as root: the repository is owned by root")
        settings = () if bare else (*SAFE_CONFIG, f"core.sharedRepository={self._shared_setting()}")
        argv = ["git"] + [x for setting in settings for x in ("-c", setting)] + list(args)
        # git reaches the repository through its pinned fd (the same number in the child); its working tree,
        # and its cwd (git resolves working tree paths against the cwd), is the empty directory
        where = {"GIT_DIR": f"{self.proc}/.git", "GIT_WORK_TREE": empty_worktree()}
        found = dict(cwd=where["GIT_WORK_TREE"], pass_fds=(self.repo_fd,), env={**ENV, **where, **(env or {})},
                     umask=0o022, **as_owner)
        return found if bare else dict(args=argv, **found)

    def run(self, *args: str, input: bytes | None = None, env: dict | None = None, ok: tuple[int, ...] = (0,),
            timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """(exit status, stdout) of one command; ``GitError`` with git's words when its status is not in ``ok``."""
        try:
            done = subprocess.run(**self._popen_args(args, env), input=input, capture_output=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {timeout:g}s") from None
        except OSError as exc:
            raise GitError(f"git could not run ({exc}): install git on the executor's host") from None
        if done.returncode not in ok:
            words = done.stderr.decode("utf-8", "replace").strip()[-600:] or f"exit {done.returncode}"
            raise GitError(f"git {args[0]} failed: {words}")
        return done.returncode, done.stdout

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw)[1].decode("utf-8", "surrogateescape").strip()

    # -- the repository --------------------------------------------------------------------------------

    @property
    def object_format(self) -> str:
        if self._format is None:
            self._format = self.out("rev-parse", "--show-object-format")
        return self._format

    def head(self) -> Head:
        """HEAD as it is now (``GitError`` when the directory is not a git repository's working tree)."""
        names = [n for n, _ in UNDERWAY]
        lines = self.out("rev-parse", "--show-object-format", *[x for n in names for x in ("--git-path", n)])
        fmt, *paths = lines.split("\n")
        self._format = fmt
        code, ref = self.run("symbolic-ref", "-q", "HEAD", ok=(0, 1))
        code_c, commit = self.run("rev-parse", "-q", "--verify", "HEAD^{commit}", ok=(0, 1))
        underway = next((what for (_, what), path in zip(UNDERWAY, paths) if self._exists(path)), None)
        return Head(ref.decode().strip() if code == 0 else None, commit.decode().strip() if code_c == 0 else None,
                    underway, fmt)

    def _exists(self, path: str) -> bool:
        # A path through the pinned fd is looked up below it; another one (a linked worktree's git dir, which
        # .git names) is only looked at, never opened.
        if path.startswith(self.proc + "/"):
            return lstat_at(self.repo_fd, path[len(self.proc) + 1:]) is not None
        return os.path.lexists(path)

    @property
    def zero(self) -> str:
        """The null object id of this repository's format."""
        return "0" * hashlib.new(self.object_format).digest_size * 2

    def rev(self, name: str) -> str | None:
        code, out = self.run("rev-parse", "-q", "--verify", f"{name}^{{commit}}", ok=(0, 1))
        return out.decode().strip() if code == 0 else None

    def tree_of(self, commit: str | None) -> str:
        return self.out("rev-parse", f"{commit}^{{tree}}") if commit else self.empty_tree()

    def empty_tree(self) -> str:
        return self.out("hash-object", "-t", "tree", "--stdin", input=b"")

    def is_ancestor(self, older: str, newer: str) -> bool:
        return self.run("merge-base", "--is-ancestor", older, newer, ok=(0, 1))[0] == 0

    def valid_branch(self, name: str) -> bool:
        return self.run("check-ref-format", "--branch", name, ok=(0, 1, 128))[0] == 0

    # -- objects ---------------------------------------------------------------------------------------

    def blob_id(self, size: int):
        h = hashlib.new(self.object_format)
        h.update(b"blob %d\0" % size)
        return h

    def store_blobs(self, blobs: Iterable[tuple[int, Iterator[bytes]]]) -> list[str]:
        """Write blobs (size, its bytes in chunks) with one ``fast-import``: no filter, no attribute, no
        working tree; their ids, computed as they stream."""
        proc = subprocess.Popen(**self._popen_args(["fast-import", "--quiet", "--done"], None),
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read(64 * 1024)), daemon=True)
        reader.start()
        ids = []
        try:
            for size, chunks in blobs:
                proc.stdin.write(b"blob\ndata %d\n" % size)
                h, written = self.blob_id(size), 0
                for chunk in chunks:
                    h.update(chunk)
                    proc.stdin.write(chunk)
                    written += len(chunk)
                if written != size:
                    raise GitError(f"a file changed size while it was stored ({written} bytes, not {size})")
                proc.stdin.write(b"\n")
                ids.append(h.hexdigest())
            proc.stdin.write(b"done\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise GitError("git fast-import took too long") from None
        finally:
            reader.join(timeout=10)
        if code != 0:
            raise GitError("git fast-import failed: " + b"".join(errors).decode("utf-8", "replace").strip()[-600:])
        return ids

    def read_blobs(self, oids: list[str]) -> Iterator[tuple[str, Iterator[bytes]]]:
        """Each blob's id and its bytes in chunks, in order, from one ``cat-file --batch`` (no filter, no
        textconv). Each item must be read whole before the next."""
        proc = subprocess.Popen(**self._popen_args(["cat-file", "--batch"], None), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

        def feed() -> None:
            try:
                proc.stdin.write("".join(f"{oid}\n" for oid in oids).encode())
                proc.stdin.close()
            except OSError:
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            for oid in oids:
                header = proc.stdout.readline().decode().split()
                if len(header) != 3 or header[1] != "blob":
                    raise GitError(f"git cat-file: {oid} is not a blob of this repository ({' '.join(header)})")
                yield oid, _chunks(proc.stdout, int(header[2]))
                proc.stdout.read(1)  # the LF after the content
        finally:
            proc.kill()
            proc.wait()
            feeder.join(timeout=10)

    def commit_tree(self, tree: str, parent: str | None, message: str, author: tuple[str, str], date: str) -> str:
        name, email = author
        env = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date,
               "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email, "GIT_COMMITTER_DATE": date}
        parents = ["-p", parent] if parent else []
        return self.out("commit-tree", "--no-gpg-sign", tree, *parents, "-F", "-", input=message.encode(), env=env)

    # -- the index and the refs ------------------------------------------------------------------------

    @contextmanager
    def temp_index(self) -> Iterator[dict]:
        """The environment of a fresh index of its own (in a private directory of the owner's), for the block."""
        where = tempfile.mkdtemp(prefix="executor-git-")
        try:
            if os.geteuid() == 0:
                os.chown(where, self.uid, self.gid)
            yield {"GIT_INDEX_FILE": os.path.join(where, "index")}
        finally:
            shutil.rmtree(where, ignore_errors=True)

    def index_entries(self, env: dict) -> Iterator[tuple[str, str]]:
        """(mode, path) of every entry of the index ``env`` names, streamed."""
        proc = subprocess.Popen(**self._popen_args(["ls-files", "-s", "-z"], env), stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        try:
            rest = b""
            while chunk := proc.stdout.read(1 << 16):
                *records, rest = (rest + chunk).split(b"\0")
                for record in records:
                    meta, _, path = record.partition(b"\t")
                    yield meta.split(b" ", 1)[0].decode(), path.decode("utf-8", "surrogateescape")
        finally:
            proc.kill()
            proc.wait()

    def update_index(self, lines: list[tuple[str, str, str]], env: dict | None = None) -> None:
        """(mode, id, path) entries into the index (mode ``0``: the path goes), as one ``--index-info``; an
        index another git holds locked is waited for a while."""
        if not lines:
            return
        zero = self.zero
        body = b"".join(f"{mode} {oid or zero}\t".encode() + path.encode("utf-8", "surrogateescape") + b"\0"
                        for mode, oid, path in lines)
        self._locked("update-index", "-z", "--index-info", input=body, env=env)

    def _locked(self, *args: str, **kw) -> None:
        import time

        for attempt in range(LOCK_TRIES):
            try:
                self.run(*args, **kw)
                return
            except GitError as exc:
                if "index.lock" not in str(exc) or attempt == LOCK_TRIES - 1:
                    raise
                time.sleep(LOCK_WAIT)

    def diff_tree(self, old: str | None, new: str) -> list[tuple[str, str, str]]:
        """What turns commit ``old`` (None: nothing) into commit ``new``, as (mode, id, path) index entries
        (mode ``0``: the path goes). Raw output only: no textconv, no external diff."""
        base = ["diff-tree", "-r", "-z", "--no-renames", "--no-ext-diff", "--no-textconv", "--full-index"]
        out = self.run(*base, *([old, new] if old else ["--root", new]))[1]
        fields = out.split(b"\0")
        if fields and not fields[0].startswith(b":"):
            fields = fields[1:]  # --root prints the commit id first
        entries = []
        for meta, path in zip(fields[0::2], fields[1::2]):
            if not meta:
                break
            _old_mode, new_mode, _old_id, new_id, _status = meta.decode().lstrip(":").split(" ")
            gone = new_mode == "000000"
            entries.append(("0" if gone else new_mode, "" if gone else new_id, path.decode("utf-8", "surrogateescape")))
        return entries

    def update_ref(self, ref: str, new: str, old: str | None) -> bool:
        """Move ``ref`` to ``new`` only if it is ``old`` now (None: only if it does not exist); False when it
        is not (someone moved it meanwhile)."""
        try:
            self.run("update-ref", "-m", "executor: land a job's change", ref, new, old or self.zero)
        except GitError:
            if self.rev(ref) != old:
                return False
            raise
        return True


def _chunks(stream, size: int) -> Iterator[bytes]:
    left = size
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise GitError("git cat-file ended before the blob did")
        left -= len(chunk)
        yield chunk
