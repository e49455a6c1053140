"""A host lost in the middle of a commit, with two real executors' recovery and heartbeat code on a real
PostgreSQL store and real repository files (the engine is a fake: no container is needed to apply a change).

The proof that a change is never applied twice: the job in ``committing`` is marked but never taken over by
the other host (its upper dir is on the lost host's disk); its own host finishes the apply when it returns;
after that a person edits the file, and every recovery and take-over that could run again leaves the
person's edit alone."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import text

from executor.clock import utcnow
from executor.scheduling import service
from executor.scheduling.recovery import recover
from executor.settings import Settings
from executor.store import Job, Status
from tests.unit.fakes import FakeDeployment

UID = 1000


def _executor(tmp_path: Path, name: str, url: str, repos: Path) -> service.Executor:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "T"\n')
    settings = Settings(home=tmp_path / name, policies=policies, workspace_roots=[repos], database_url=url,
                        host_id=name, host_timeout=30, host_heartbeat=1)
    return service.Executor(settings, {}, deployment=FakeDeployment())


def _owned(path: Path, content: str | None = None) -> Path:
    if content is None:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.write_text(content)
    os.chown(path, UID, UID)
    return path


def test_a_commit_interrupted_by_a_lost_host_is_finished_by_that_host_once(tmp_path, pg_url):
    repos = _owned(tmp_path / "repos")
    repo = _owned(repos / "app")
    _owned(repo / "count.txt", "0\n")
    host_a = _executor(tmp_path, "host-a", pg_url, repos)
    host_b = _executor(tmp_path, "host-b", pg_url, repos)  # holds the same workspace root
    host_a.presence.register()
    host_b.presence.register()
    store = host_a.store
    st = os.stat(repo)
    store.add_job(Job(id="J", session_id="J", runner="r", model_requested="m", workspace=str(repo), prompt="p",
                      policy_name="default", policy={"cpus": 1.0}, repo_uid=UID, repo_gid=UID,
                      workspace_dev=st.st_dev, workspace_ino=st.st_ino))
    claimed = store.claim("host-a", [str(repos)], 4, 2**33)
    assert claimed.id == "J" and claimed.host_id == "host-a"
    upper = tmp_path / "host-a" / "jobs" / "J" / "layers" / "upper"
    _owned(upper)
    _owned(upper / "count.txt", "1\n")  # the tested change: count 0 -> 1
    owner = ("host-a", claimed.attempts)
    store.transition("J", Status.running, Status.testing, owner=owner)
    store.transition("J", Status.testing, Status.committing, owner=owner, start_ns=0)
    # host-a dies here, before its apply: its heartbeat goes stale
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE host SET last_seen = :t WHERE id = 'host-a'"),
                      {"t": utcnow().replace(year=utcnow().year - 1)})

    taken = host_b.presence.look_after_lost()  # host-b notices, marks, and takes nothing over
    recover(host_b)  # nor does its own recovery touch another host's job
    job = store.get("J")
    assert taken == [] and job.status == Status.committing and job.host_id == "host-a"
    assert job.interrupted_at is not None
    assert (repo / "count.txt").read_text() == "0\n"  # nothing applied yet
    assert [e.data["seen_by"] for e in store.events(job_id="J") if e.kind == "host_lost"] == ["host-b"]

    host_a.presence.register()  # host-a comes back: alive again, its jobs its own again
    recover(host_a)  # finishes the commit from its kept upper dir
    job = store.get("J")
    assert (job.status, job.reason, job.interrupted_at) == (Status.succeeded, "committed", None)
    assert (repo / "count.txt").read_text() == "1\n"
    assert not upper.exists()

    _owned(repo / "count.txt", "edited by a person\n")  # a second apply would overwrite this
    for executor in (host_b, host_a):
        executor.presence.look_after_lost()
        recover(executor)
    assert (repo / "count.txt").read_text() == "edited by a person\n"
    states = [e.data["status"] for e in store.events(job_id="J") if e.kind == "state"]
    assert states.count("succeeded") == 1
    for executor in (host_a, host_b):
        executor.store.close()
