"""``executor backup`` and ``executor prune``: keeping a home server's state root safe and small.

Owns the consistent copy of the database while the executor serves (SQLite's online backup API: the copy
is one transaction's view, whatever the writer does meanwhile; a PostgreSQL store is pg_dump's) and the removal of what is old: accepted
and rejected spool files, session homes (Claude Code's transcripts) of sessions with no recent job, and
kept upper dirs of ended jobs (a conflict's, a failed apply's) and decided reviews' diffs, every removal
through pinned fds.

Must never: remove anything of a job that has not ended, a change a queued revision is to take, anything of
a session with a recent job, follow a link,
or write a backup over an existing file.
"""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import timedelta
from pathlib import Path

import click

from .cli_common import load_settings, open_store


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def backup(path: Path, as_json: bool) -> None:
    """A consistent copy of the database at PATH, taken while the executor serves (restore: stop the
    executor, copy it to $EXECUTOR_HOME/executor.db, start it)."""
    settings = load_settings()
    if settings.shared_store:
        raise click.ClickException("the store is a PostgreSQL database (EXECUTOR_DATABASE_URL): back it up with "
                                   "pg_dump on the database's host (README: Several hosts)")
    if not settings.db_path.exists():
        raise click.ClickException(f"no database at {settings.db_path}: is EXECUTOR_HOME right?")
    if path.exists() or path.is_symlink():
        raise click.ClickException(f"{path} exists: a backup never overwrites; choose a new name")
    from ..store.copies import backup_sqlite

    started = time.monotonic()
    jobs, check = backup_sqlite(settings.db_path, path)  # in steps: the serving executor keeps writing
    os.chmod(path, 0o600)  # prompts and logs are the operator's business only
    result = {"path": str(path), "bytes": path.stat().st_size, "jobs": jobs, "integrity": check,
              "seconds": round(time.monotonic() - started, 3)}
    click.echo(json.dumps(result) if as_json else
               f"backed up {jobs} jobs to {path} ({result['bytes']} bytes, integrity {check}, {result['seconds']} s)")


@click.command()
@click.option("--older-than", "older_than", default="30d", show_default=True,
              help="Age beyond which things go: e.g. 7d, 30d, 12h.")
@click.option("--dry-run", is_flag=True, help="Say what would go, remove nothing.")
@click.option("--json", "as_json", is_flag=True)
def prune(older_than: str, dry_run: bool, as_json: bool) -> None:
    """Remove accepted and rejected spool files, session transcripts, kept upper dirs and decided reviews'
    diffs older than the age given; jobs that have not ended and sessions with a recent job are left alone."""
    from ..clock import aware, utcnow
    from ..settings import parse_duration
    from ..transaction.jobdisk import remove as remove_job_dir
    from ..transaction.safefs import remove_tree

    settings = load_settings()
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    cutoff = utcnow() - timedelta(seconds=age)
    store = open_store(settings)
    gone: dict[str, list[str]] = {"spool": [], "sessions": [], "jobs": [], "reviews": []}
    for sub in ("accepted", "rejected"):
        gone["spool"] += [f"{sub}/{name}" for name in _old_files(settings.spool_dir / sub, cutoff.timestamp())]
    for name in _entries(settings.jobs_dir):
        job = store.get(name)
        if job is not None and job.status.terminal and job.finished_at and aware(job.finished_at) < cutoff \
                and not any(not f.status.terminal for f in store.followers(name)):  # a revision still to take it
            gone["jobs"].append(name)
    for name in _entries(settings.reviews_dir):
        job = store.get(name.removesuffix(".json"))
        if job is None or (job.status.terminal and job.finished_at and aware(job.finished_at) < cutoff):
            gone["reviews"].append(name)
    for name in _entries(settings.sessions_dir):
        jobs = store.session_jobs(name)
        if all(j.status.terminal and j.finished_at and aware(j.finished_at) < cutoff for j in jobs):
            gone["sessions"].append(name)
    if not dry_run:
        for rel in gone["spool"]:
            os.unlink(settings.spool_dir / rel)  # a plain file checked by lstat just now, in a root-only dir
        for name in gone["jobs"]:
            remove_job_dir(settings.jobs_dir / name)  # its disk image unmounted first
        for name in gone["sessions"]:
            remove_tree(settings.sessions_dir / name)
        for name in gone["reviews"]:
            os.unlink(settings.reviews_dir / name)  # written by the executor alone, in a root-only dir
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "older_than": older_than, **gone}))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(gone['spool'])} spool files, {len(gone['jobs'])} job dirs, "
               f"{len(gone['sessions'])} session homes, {len(gone['reviews'])} decided reviews' diffs older than "
               f"{older_than}")


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _old_files(directory: Path, before: float) -> list[str]:
    old = []
    for name in _entries(directory):
        st = os.lstat(directory / name)
        if stat.S_ISREG(st.st_mode) and st.st_mtime < before:
            old.append(name)
    return old
