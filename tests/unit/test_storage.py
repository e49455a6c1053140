"""Storage locality: which storage each workspace root is (the marker ``intake/storage.py`` writes and reads,
attacked with links, other files and garbage), and a claim that goes by it on both engines: a job accepted
on one host's own disk is never claimed by a host whose same path is another directory; a root two hosts
share (one marker) serves both; a job no running host can serve waits, saying why."""

from __future__ import annotations

import os
import stat

import pytest

from executor.clock import utcnow
from executor.intake import storage
from executor.intake.storage import MARKER, identify, local, storage_of
from executor.policy import Policy, Runner
from executor.scheduling import admission
from executor.scheduling.governor import Governor
from executor.settings import parse_size
from executor.store import Job, Status, Store

RUNNERS = {"r": Runner(name="r", model="claude-sonnet-4-5", auth_env="T")}
OWNER = 1000


def root(tmp_path, name: str):
    path = tmp_path / name
    path.mkdir()
    os.chown(path, OWNER, OWNER)
    return path


# ------------------------------------------------------------------------------------------ the marker


def test_the_first_host_writes_the_marker_as_the_roots_owner_and_every_host_reads_the_same(tmp_path):
    shared, own = root(tmp_path, "shared"), root(tmp_path, "own")
    first = identify([shared, own], "host-a", create=True)
    st = os.lstat(shared / MARKER)
    assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_gid) == (OWNER, OWNER)
    assert first[str(shared)] != first[str(own)]  # two directories: two storages
    assert identify([shared], "host-b", create=True) == {str(shared): first[str(shared)]}  # read, not rewritten
    assert identify([shared], "host-b") == {str(shared): first[str(shared)]}
    assert sorted(p.name for p in shared.iterdir()) == [MARKER]  # no temporary file left behind


def test_a_root_without_a_marker_that_cannot_have_one_is_this_hosts_alone(tmp_path):
    ro = root(tmp_path, "ro")
    os.chmod(ro, 0o555)  # its owner cannot write there (and root writes as its owner)
    assert identify([ro], "host-a", create=True) == {str(ro): local("host-a")}
    assert identify([tmp_path / "absent"], "host-a", create=True) == {str(tmp_path / "absent"): local("host-a")}
    assert identify([root(tmp_path, "unread")], "host-b") == {str(tmp_path / "unread"): local("host-b")}


@pytest.mark.parametrize("attack", ["link", "directory", "garbage", "fifo", "huge"])
def test_a_marker_that_is_not_one_is_never_followed_or_trusted(tmp_path, attack):
    shared = root(tmp_path, "shared")
    other = root(tmp_path, "other")
    theirs = identify([other], "host-x", create=True)[str(other)]
    marker = shared / MARKER
    if attack == "link":  # someone points the marker at another storage's identity
        marker.symlink_to(other / MARKER)
    elif attack == "directory":
        marker.mkdir()
    elif attack == "garbage":
        marker.write_text("../../etc/passwd\n")
    elif attack == "fifo":
        os.mkfifo(marker)  # opened non-blocking, never waited on
    else:
        marker.write_text(theirs + "0" * 4096)
    found = identify([shared], "host-a", create=True)
    assert found == {str(shared): local("host-a")} and found[str(shared)] != theirs
    assert os.path.lexists(marker) and (attack != "link" or os.readlink(marker) == str(other / MARKER))


def test_two_hosts_writing_at_once_agree_on_one_identity(tmp_path):
    shared = root(tmp_path, "shared")
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:  # both looked, found none, and write: the first link wins, the second host's identity is dropped
        storage._create(fd)
        first = (shared / MARKER).read_text()
        storage._create(fd)
    finally:
        os.close(fd)
    assert (shared / MARKER).read_text() == first and sorted(p.name for p in shared.iterdir()) == [MARKER]
    assert identify([shared], "host-b") == {str(shared): first.strip()}


def test_a_workspace_lies_on_the_storage_of_the_deepest_root_it_is_under():
    roots = {"/srv": "s1", "/srv/nfs": "s2", "/": "s0"}
    assert storage_of(roots, "/srv/nfs/app") == "s2" and storage_of(roots, "/srv/app") == "s1"
    assert storage_of(roots, "/srv/nfsx/app") == "s1" and storage_of(roots, "/home/x") == "s0"
    assert storage_of({"/srv": "s1"}, "/home/x") is None


# ------------------------------------------------------------------------------------------ the claim


def job(job_id: str, storage_id: str | None, workspace: str = "/srv/workspaces/app", **fields) -> Job:
    return Job(id=job_id, session_id=job_id, runner="r", model_requested="m", workspace=workspace, prompt="p",
               policy_name="default", policy=Policy(cpus=1.0, memory="512m").model_dump(), storage=storage_id,
               **fields)


def governor() -> Governor:
    return Governor(8.0, parse_size("64g"), parse_size("256m"))


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


ROOT = "/srv/workspaces"
BOX1 = admission.Host("box1", (ROOT,), {ROOT: "disk-of-box1"})
BOX2 = admission.Host("box2", (ROOT,), {ROOT: "disk-of-box2"})


def test_a_job_on_a_hosts_own_disk_is_claimed_only_there_though_the_path_is_the_same(store):
    store.add_job(job("on-box1", "disk-of-box1", spool_host="box1"))
    store.add_job(job("on-box2", "disk-of-box2", workspace="/srv/workspaces/lib", spool_host="box2"))
    plan = admission.claim(store, governor(), BOX2, RUNNERS, {})
    assert [j.id for j, _ in plan.starts] == ["on-box2"]
    assert store.get("on-box1").status == Status.queued
    assert store.head("box2", BOX2.serving) is None
    plan = admission.claim(store, governor(), BOX1, RUNNERS, {})
    assert [j.id for j, _ in plan.starts] == ["on-box1"] and store.get("on-box1").host_id == "box1"


def test_a_root_both_hosts_share_serves_both_and_a_job_from_before_goes_by_its_path(store):
    both = [admission.Host(h, (ROOT,), {ROOT: "nfs"}) for h in ("box1", "box2")]
    store.add_job(job("shared-1", "nfs", spool_host="box1"))
    store.add_job(job("shared-2", "nfs", workspace="/srv/workspaces/lib", spool_host="box1"))
    store.add_job(job("older", None, workspace="/srv/workspaces/old"))
    assert [j.id for j, _ in admission.claim(store, governor(), both[1], RUNNERS, {}).starts] == \
        ["shared-1", "shared-2", "older"]


def test_a_job_no_running_host_can_serve_waits_and_says_why(store):
    now = utcnow()
    queue = [job("on-box1", "disk-of-box1"), job("lost", "disk-of-box9", workspace="/srv/workspaces/x")]
    hosts = [{"host": "box1", "state": "alive", "storage": {ROOT: "disk-of-box1"}},
             {"host": "box2", "state": "alive", "storage": {ROOT: "disk-of-box2"}},
             {"host": "box9", "state": "stopped", "storage": {ROOT: "disk-of-box9"}}]
    why = admission.reasons(queue, [], BOX2, governor(), set(), set(), {}, now, hosts)
    assert "host box1 runs it" in why["on-box1"] and "another directory" in why["on-box1"]
    assert "no host that holds it is running (box9 (stopped))" in why["lost"]
    why = admission.reasons([job("nowhere", "disk-of-none")], [], BOX2, governor(), set(), set(), {}, now, hosts)
    assert "no host holds it now" in why["nowhere"] and "disk-of-none" in why["nowhere"]
    assert admission.reasons(queue[:1], [], BOX1, governor(), set(), set(), {}, now, hosts) == {
        "on-box1": "starts at the next claim round"}  # its own host has it


def test_queued_jobs_accepted_before_storage_was_recorded_get_their_roots_storage(store):
    store.add_job(job("mine", None, spool_host="box1"))
    store.add_job(job("theirs", None, spool_host="box2"))
    store.add_job(job("elsewhere", None, workspace="/home/x", spool_host="box1"))
    assert store.stamp_storage("box1", {ROOT: "disk-of-box1"}) == 1
    assert [store.get(j).storage for j in ("mine", "theirs", "elsewhere")] == ["disk-of-box1", None, None]
