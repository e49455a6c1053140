"""Retention: which job directories under the state root go, and when.

Owns the rule: the directory of a settled job goes at once, unless the job kept its change for inspection
(a conflict, a failed apply, a change git would not take) or for the follow-up that revises it (changes
requested in review), which stays for ``EXECUTOR_RETENTION``; directories of jobs that are not settled stay, unless (given this host's
id) the job is no longer this host's: another host took it over while this one was lost, so what is left
here is a rolled-back attempt. (Decided reviews' diffs are small and stay until ``executor prune``.)
Removal unmounts the job's disk image first and never follows a link (``jobdisk.remove``).

Must never: remove the directory of a job that is not settled and still this host's.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from ..clock import aware, utcnow
from ..errors import ChangesRequested, CommitFailed, Conflict, GitError
from ..settings import Settings
from ..store import Store
from . import jobdisk

log = logging.getLogger(__name__)

KEPT_FOR_INSPECTION = frozenset({Conflict.reason, CommitFailed.reason, ChangesRequested.reason, GitError.reason})


def remove_expired(settings: Settings, store: Store, host_id: str | None = None) -> list[str]:
    """Remove the job dirs whose time is up (and, with ``host_id``, those of jobs that are now another
    host's or no host's); returns the job ids removed."""
    cutoff = utcnow() - timedelta(seconds=settings.retention)
    try:
        names = os.listdir(settings.jobs_dir)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        job = store.get(name)
        if job is not None and not job.status.terminal and (host_id is None or job.host_id == host_id):
            continue
        finished = aware(job.finished_at) if job is not None and job.finished_at else None
        kept = job is not None and job.reason in KEPT_FOR_INSPECTION
        if not kept or finished is None or finished < cutoff:
            jobdisk.remove(settings.jobs_dir / name)
            removed.append(name)
            log.info("removed expired job dir", extra={"action": "retention", "job": name})
    return removed
