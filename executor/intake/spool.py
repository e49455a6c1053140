"""The spool: a maildir-style directory through which job files arrive, are accepted or are rejected.

Owns ``$EXECUTOR_HOME/spool/{tmp,incoming,accepted,rejected}``. Writers put a file in ``tmp/``, fsync it
and rename it into ``incoming/`` (so intake never sees half a file). Intake reads each incoming file
without following symlinks, commits the job to the store, and only then moves the file to
``accepted/``; a bad file goes to ``rejected/`` beside ``NAME.error.json``. A crash between any two steps
neither loses a job nor runs it twice: the store remembers which spool file a job came from, and through
which host's spool (several hosts share one store, each with its own spool: a name another host's spool
already used is taken as a new file here, never mistaken for this spool's half-finished move).

Every file is read inside a boundary: whatever reading, parsing or validating it raises (deep nesting, a
name that is not UTF-8, a bug of ours) rejects that file alone, and the serving loop goes on. The name of the
file being read is noted in ``.reading`` first, so a file that crashes the whole process (a segfault, the
kernel's OOM killer) is quarantined in ``rejected/`` at the next start instead of being read again.

Must never: delete a job file, run anything, accept a file the store did not take, or let one file's
failure stop the intake of the others.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..agent.registry import resolved
from ..errors import InvalidJob
from ..policy import Runner
from ..settings import Settings
from ..store import Job, Status, Store
from ..untrusted import load_json
from .jobs import JOB_ID, ValidJob, parse_spec, validate
from .storage import storage_of

log = logging.getLogger(__name__)

MAX_JOB_FILE = 1024 * 1024  # 1 MiB: a prompt is text, not a payload
#: Names intake takes as they are: printable ASCII without a path separator, short enough that the names the
#: spool derives from them (``NAME.error.json``, a fresh prefix) still fit a file name (255 bytes).
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,179}$")
#: What a file that stopped the executor while it was read is rejected with.
CRASHED = ("reading this file stopped the executor (it was being read when the process died), so it was "
           "quarantined instead of being read again; check it, and submit a fixed copy under a new name")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_name(suffix: str = ".json") -> str:
    # maildir-style: time, host, pid and randomness, so concurrent writers never collide
    return f"{time.time_ns()}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def _plain_suffix(name: str) -> str:
    """What of a writer's name a fresh name keeps: printable characters only, clipped."""
    kept = re.sub(r"[^A-Za-z0-9._+=@,-]", "_", name)[-80:]
    return "." + kept if kept else ".json"


@dataclass
class IntakeResult:
    accepted: list[str]
    rejected: list[str]
    more: bool = False  # files are left in incoming/ for the next tick
    rejected_ids: list[str] = field(default_factory=list)  # refused files recorded as jobs (status rejected)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        self.accepted = root / "accepted"
        self.rejected = root / "rejected"
        self.reading = root / ".reading"  # the name of the file intake is reading now (see the docstring)
        for d in (self.tmp, self.incoming, self.accepted, self.rejected):
            d.mkdir(parents=True, exist_ok=True)

    # -- writers ------------------------------------------------------------------------------------

    def write(self, content: bytes, name: str | None = None) -> Path:
        """Atomically place ``content`` in ``incoming/`` (tmp, fsync, rename, fsync the directory)."""
        name = name or _unique_name()
        tmp_path = self.tmp / name
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.incoming / name
        os.rename(tmp_path, final)
        _fsync_dir(self.incoming)
        return final

    # -- intake -------------------------------------------------------------------------------------

    def pending(self, limit: int | None = None) -> list[str]:
        """Names in ``incoming/``, oldest first (maildir names start with the time); the oldest ``limit`` only
        when given, so a flood of a million files costs one pass over the directory, not a list of it."""
        with os.scandir(self.incoming) as entries:
            names = (e.name for e in entries if not e.name.startswith("."))
            return heapq.nsmallest(limit, names) if limit is not None else sorted(names)

    def plain(self, name: str) -> str:
        """The name to take the file under: its own when it is plain, else a fresh one (a name that is not
        UTF-8, holds control characters or is so long that ``NAME.error.json`` could not be made)."""
        if _PLAIN_NAME.match(name):
            return name
        fresh = _unique_name(suffix=_plain_suffix(name))
        os.rename(self.incoming / name, self.incoming / fresh)
        log.warning("job file renamed", extra={"action": "renamed", "file": repr(name), "to": fresh})
        return fresh

    def note_reading(self, name: str | None) -> None:
        """Note the file about to be read (None: none is). Not fsynced: it guards against the process dying
        while it reads, not the machine; the page cache outlives the process."""
        if name is None:
            try:
                os.unlink(self.reading)
            except FileNotFoundError:
                pass
            return
        fd = os.open(self.reading, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.fsencode(name))
        finally:
            os.close(fd)

    def crashed_while_reading(self) -> str | None:
        """The incoming file a previous process was reading when it died, if it is still there."""
        try:
            fd = os.open(self.reading, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            os.unlink(self.reading)  # not a file of ours (a link, a directory): nothing to learn from it
            return None
        try:
            name = os.fsdecode(os.read(fd, 4096))
        finally:
            os.close(fd)
        if not name or "/" in name or not os.path.lexists(self.incoming / name):
            self.note_reading(None)
            return None
        return name

    def read(self, name: str) -> bytes:
        """The file's bytes, refusing anything that is not a small regular file (no symlinks, fifos)."""
        try:
            fd = os.open(self.incoming / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidJob("the spool entry is a symlink; write the job file itself into the spool") from None
            raise InvalidJob(f"cannot open the job file: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidJob("the spool entry is not a regular file; write a JSON job file")
            if st.st_size > MAX_JOB_FILE:
                raise InvalidJob(f"the job file is {st.st_size} bytes; the limit is {MAX_JOB_FILE} (1 MiB)")
            data = os.read(fd, MAX_JOB_FILE + 1)
            if len(data) > MAX_JOB_FILE:
                raise InvalidJob(f"the job file is larger than {MAX_JOB_FILE} bytes (1 MiB)")
            return data
        finally:
            os.close(fd)

    def accept(self, name: str, sync: bool = True) -> None:
        """Move a committed job's file to ``accepted/`` (``sync=False``: the caller syncs once per batch)."""
        os.rename(self.incoming / name, self.accepted / name)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Make the renames in the spool durable."""
        _fsync_dir(self.accepted)
        _fsync_dir(self.incoming)

    def reject(self, name: str, error: str) -> None:
        """Move the file to ``rejected/`` beside ``NAME.error.json`` (written first, atomically)."""
        report = json.dumps({"file": name, "error": error, "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2)
        tmp = self.tmp / f"{name}.error.json"
        tmp.write_text(report + "\n")
        os.rename(tmp, self.rejected / f"{name}.error.json")
        os.rename(self.incoming / name, self.rejected / name)
        _fsync_dir(self.rejected)
        _fsync_dir(self.incoming)

    def rename_incoming(self, name: str) -> str:
        """Give an incoming file a fresh unique name (its old name was already used by an earlier job)."""
        new = _unique_name(suffix=_plain_suffix(name))
        os.rename(self.incoming / name, self.incoming / new)
        return new


def job_from(valid: ValidJob, spool_name: str | None, spool_host: str | None = None,
             storage: Mapping[str, str] | None = None) -> Job:
    """The job row of a valid job file; ``storage``: the storage of each of the accepting host's roots."""
    return Job(
        id=valid.id,
        session_id=valid.session_id,
        runner=valid.runner.name,
        agent=valid.runner.agent,
        model_requested=valid.runner.model,
        workspace=str(valid.workspace),
        prompt=valid.spec.prompt,
        policy_name=valid.spec.policy,
        policy=resolved(valid.policy, valid.runner).model_dump(),
        test_command=valid.test_command,
        priority=valid.spec.priority,
        skills=valid.spec.skills,
        context=valid.spec.context,
        follows=valid.spec.follows,
        spool_name=spool_name,
        spool_host=spool_host,
        cpus=valid.policy.cpus,
        memory=valid.policy.memory,
        repo_uid=valid.identity.uid,
        repo_gid=valid.identity.gid,
        workspace_dev=valid.identity.dev,
        workspace_ino=valid.identity.ino,
        storage=storage_of(storage, valid.workspace) if storage else None,
    )


#: Files validated and committed to the store in one transaction (one fsync for the lot).
BATCH = 100
#: The oldest files one intake call looks at (the rest wait for the next call).
PENDING_WINDOW = 20 * BATCH


def intake(spool: Spool, store: Store, settings: Settings, runners: dict[str, Runner] | None = None,
           budget: float | None = None, translate: Callable[[str], str] | None = None,
           storage: Mapping[str, str] | None = None) -> IntakeResult:
    """Take the files in ``incoming/``: commit them as jobs, then accept them; or reject each with a reason.

    Works in batches (validated, committed in one transaction, then moved, with one fsync of each spool
    directory per batch) and stops after ``budget`` seconds, so a flood of files never holds up the serving
    loop: ``IntakeResult.more`` says files are left for the next tick. ``translate`` maps a workspace written
    as a host path to the path this executor sees (when it runs in a container). ``storage``: the storage
    of each of this host's roots (``storage.py``), recorded with each job (only hosts that see the same
    storage claim it). A file that a previous
    process died reading is rejected first, unread.
    """
    started = time.monotonic()
    result = IntakeResult(accepted=[], rejected=[])
    crashed = spool.crashed_while_reading()
    if crashed is not None:
        log.error("job file quarantined", extra={"action": "quarantined", "file": crashed})
        _reject(spool, crashed, InvalidJob(CRASHED), result)
        spool.note_reading(None)
    pending = spool.pending(limit=PENDING_WINDOW)
    result.more = len(pending) == PENDING_WINDOW
    while pending:
        batch, pending = pending[:BATCH], pending[BATCH:]
        _take(spool, store, settings, runners, batch, result, translate, storage)
        if budget is not None and pending and time.monotonic() - started > budget:
            result.more = True
            break
    return result


def _take(spool: Spool, store: Store, settings: Settings, runners: dict[str, Runner] | None, names: list[str],
          result: IntakeResult, translate: Callable[[str], str] | None = None,
          storage: Mapping[str, str] | None = None) -> None:
    valid: list[tuple[str, ValidJob]] = []
    for name in names:
        try:
            name = _fresh_name(spool, store, spool.plain(name), settings.host_id)
        except FileNotFoundError:
            continue  # taken out of incoming/ meanwhile (by a person): nothing to read
        if name is None:
            continue
        raw = None
        spool.note_reading(name)
        try:
            raw = spool.read(name)
            spec = parse_spec(raw)
            if translate is not None:
                spec = spec.model_copy(update={"workspace": translate(spec.workspace)})
            valid.append((name, validate(spec, settings, runners)))
        except InvalidJob as exc:
            _reject(spool, name, exc, result, store, raw)
        except Exception as exc:  # the boundary: nothing one file does may stop the intake of the others
            log.exception("job file could not be read", extra={"action": "intake_failed", "file": name})
            _reject(spool, name, InvalidJob(f"the executor could not read this job file ({type(exc).__name__}: "
                                            f"{str(exc)[:200]}); check it and submit it again"), result, store, raw)
        finally:
            spool.note_reading(None)
    refused = store.add_jobs([job_from(v, name, settings.host_id, storage) for name, v in valid])
    for index, (name, v) in enumerate(valid):
        if index in refused:
            _reject(spool, name, refused[index], result)
            continue
        spool.accept(name, sync=False)
        log.info("job accepted", extra={"action": "accepted", "job": v.id, "file": name})
        result.accepted.append(v.id)
    spool.sync()


def _fresh_name(spool: Spool, store: Store, name: str, host: str) -> str | None:
    """The name to take the file under, or None when it was taken already (only its move was left)."""
    known = store.find_by_spool_name(name)
    if known is not None and known.spool_host not in (None, host):
        return spool.rename_incoming(name)  # another host's spool had a file of that name: this one is new
    if known is not None:
        if not (spool.accepted / name).exists():
            # Crash after the job was committed but before the file moved: finish the move only.
            spool.accept(name)
            return None
        # A writer reused a name that an earlier job already had: take it as a new file.
        return spool.rename_incoming(name)
    if os.path.lexists(spool.accepted / name) or os.path.lexists(spool.rejected / name):
        # The name was used by an earlier file (rejected, or accepted by a store since replaced):
        # moving this one there would overwrite, and so delete, that earlier file.
        return spool.rename_incoming(name)
    return name


def _reject(spool: Spool, name: str, exc: InvalidJob, result: IntakeResult, store: Store | None = None,
            raw: bytes | None = None) -> None:
    """Move the file to ``rejected/`` with its error first; then, best effort, record it as a job."""
    log.warning("job file rejected", extra={"action": "rejected", "file": name, "error": str(exc)})
    spool.reject(name, str(exc))
    result.rejected.append(name)
    if store is None:
        return
    try:
        recorded = _record_rejection(store, name, raw, exc)
    except Exception:  # the file is safe in rejected/ with its error file: a record that fails loses nothing
        log.exception("rejected job file not recorded", extra={"action": "rejected", "file": name})
        return
    if recorded is not None:
        result.rejected_ids.append(recorded)


def _record_rejection(store: Store, name: str, raw: bytes | None, exc: InvalidJob) -> str | None:
    """A refused file becomes a job record (status ``rejected``, its error) under the id its submitter was
    given, so ``executor show ID`` tells the truth; a file without a usable id is known by its spool name."""
    try:
        data = load_json(raw) if raw else {}
    except ValueError:
        data = {}
    data = data if isinstance(data, dict) else {}
    job_id = data.get("id")
    if not (isinstance(job_id, str) and JOB_ID.match(job_id)) or store.get(job_id) is not None:
        return None  # no id to answer to, or the id is another job's (a duplicate): the spool's report says it
    text = lambda key, limit: str(data.get(key) or "")[:limit]  # noqa: E731 - untrusted, clipped
    session = data.get("session_id") if isinstance(data.get("session_id"), str) and JOB_ID.match(data["session_id"]) \
        else job_id
    store.add_rejected(Job(id=job_id, session_id=session, runner=text("runner", 200), model_requested="",
                           workspace=text("workspace", 4096), prompt=text("prompt", 20000),
                           policy_name=text("policy", 64) or "default", status=Status.rejected,
                           reason=InvalidJob.reason, error=str(exc), spool_name=name))
    return job_id
