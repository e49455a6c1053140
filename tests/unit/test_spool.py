"""Tests for executor.spool: atomic writes, intake (accept / reject), crash safety and hostile entries.

Uses the ``world`` fixture (a state root, a policy, runners.toml and repositories owned by uid 1000);
no Docker.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from executor.intake import spool as spool_mod
from executor.intake.spool import MAX_JOB_FILE, Spool, intake
from executor.store import Job, Status, Store


@pytest.fixture
def env(world):
    repo = world.repo("app")
    settings = world.settings()
    sp = Spool(settings.spool_dir)
    store = Store(settings.db_path)
    yield world, repo, settings, sp, store
    store.close()


def job_json(repo: Path, **fields) -> bytes:
    body = {"runner": "scripted", "workspace": str(repo), "prompt": "write hello.txt"}
    body.update(fields)
    return json.dumps(body).encode()


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def all_jobs(store: Store) -> list[Job]:
    return store.jobs()


# ---------------------------------------------------------------------------------------------
# writing


def test_directories_are_created(tmp_path):
    sp = Spool(tmp_path / "spool")
    for d in ("tmp", "incoming", "accepted", "rejected"):
        assert (tmp_path / "spool" / d).is_dir()
    assert sp.pending() == []


def test_write_lands_complete_in_incoming_and_tmp_is_empty(tmp_path):
    sp = Spool(tmp_path / "spool")
    content = b'{"x": 1}' + b" " * 100_000 + b"\n"
    path = sp.write(content)
    assert path.parent == sp.incoming
    assert path.read_bytes() == content
    assert listing(sp.tmp) == []
    assert listing(sp.incoming) == [path.name]
    assert sp.pending() == [path.name]


def test_write_is_tmp_fsync_rename_fsync(tmp_path, monkeypatch):
    """The file is complete and fsynced in tmp/ before the rename makes it visible in incoming/."""
    sp = Spool(tmp_path / "spool")
    content = b'{"runner": "r"}' * 1000
    calls: list[tuple] = []
    real_rename, real_fsync = os.rename, os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync", target))
        return real_fsync(fd)

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        # at the moment it becomes visible: complete, and not there yet
        calls.append(("rename", src.parent.name, dst.parent.name, src.read_bytes() == content, dst.exists()))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    path = sp.write(content, name="1.test.json")

    assert path == sp.incoming / "1.test.json"
    renames = [c for c in calls if c[0] == "rename"]
    assert renames == [("rename", "tmp", "incoming", True, False)]
    i_rename = calls.index(renames[0])
    assert ("fsync", str(sp.tmp / "1.test.json")) in calls[:i_rename]  # the file's data is durable first
    assert ("fsync", str(sp.incoming)) in calls[i_rename:]  # then the rename itself
    assert listing(sp.tmp) == []


def test_write_refuses_to_clobber_a_name_in_tmp(tmp_path):
    sp = Spool(tmp_path / "spool")
    (sp.tmp / "same.json").write_bytes(b"someone else's half-written file")
    with pytest.raises(FileExistsError):
        sp.write(b"{}", name="same.json")
    assert (sp.tmp / "same.json").read_bytes() == b"someone else's half-written file"
    assert listing(sp.incoming) == []


def test_concurrent_writers_never_collide(tmp_path):
    sp = Spool(tmp_path / "spool")
    paths: list[Path] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(20):
            p = sp.write(f'{{"n": {n}, "i": {i}}}'.encode())
            with lock:
                paths.append(p)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in paths}) == 160
    assert len(sp.pending()) == 160
    contents = {p.read_bytes() for p in paths}
    assert len(contents) == 160
    assert listing(sp.tmp) == []


def test_pending_is_oldest_first_and_skips_dotfiles(tmp_path):
    sp = Spool(tmp_path / "spool")
    first = sp.write(b"{}")
    second = sp.write(b"{}")
    (sp.incoming / ".editor-swap").write_bytes(b"x")
    assert sp.pending() == [first.name, second.name]


# ---------------------------------------------------------------------------------------------
# intake: accept


def test_intake_accepts_a_good_job(env):
    world, repo, settings, sp, store = env
    path = sp.write(job_json(repo, id="good-1", priority=3, test_command="make check"))
    result = intake(sp, store, settings)

    assert result.accepted == ["good-1"] and result.rejected == []
    job = store.get("good-1")
    assert job is not None and job.status == Status.queued
    assert job.spool_name == path.name
    assert job.runner == "scripted" and job.model_requested == "claude-sonnet-4-5"
    assert job.workspace == str(repo.resolve())
    assert job.prompt == "write hello.txt" and job.priority == 3 and job.test_command == "make check"
    assert job.session_id == "good-1"
    assert job.repo_uid == 1000 and job.repo_gid == 1000
    assert job.policy_name == "default" and job.policy["memory"] == 1024**3 and job.policy["network"] == "sealed"
    assert listing(sp.incoming) == []
    assert listing(sp.accepted) == [path.name]
    assert (sp.accepted / path.name).read_bytes() == job_json(repo, id="good-1", priority=3,
                                                               test_command="make check")
    assert listing(sp.rejected) == []


def test_intake_generates_an_id_when_the_file_has_none(env):
    world, repo, settings, sp, store = env
    path = sp.write(job_json(repo))
    result = intake(sp, store, settings)
    (job_id,) = result.accepted
    assert store.get(job_id).spool_name == path.name
    assert store.find_by_spool_name(path.name).id == job_id


def test_intake_is_idempotent(env):
    world, repo, settings, sp, store = env
    sp.write(job_json(repo, id="once"))
    intake(sp, store, settings)
    again = intake(sp, store, settings)
    assert again.accepted == [] and again.rejected == []
    assert [j.id for j in all_jobs(store)] == ["once"]


# ---------------------------------------------------------------------------------------------
# intake: reject


BAD = {
    "malformed": (lambda repo: b'{"runner": "scripted",', "not valid JSON"),
    "not-object": (lambda repo: b"[1, 2]", "one JSON object"),
    "missing-field": (lambda repo: json.dumps({"runner": "scripted", "prompt": "p"}).encode(),
                      "missing required field 'workspace'"),
    "unknown-field": (lambda repo: job_json(repo, model="opus"), "unknown field 'model'"),
    "bad-id": (lambda repo: job_json(repo, id="../../etc"), "id"),
    "unknown-runner": (lambda repo: job_json(repo, runner="nobody"), "unknown runner 'nobody'"),
    "unknown-policy": (lambda repo: job_json(repo, policy="nope"), "does not exist"),
    "outside-roots": (lambda repo: job_json(repo, workspace="/tmp"), "not under a workspace root"),
    "relative": (lambda repo: job_json(repo, workspace="app"), "not an absolute path"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_intake_rejects_bad_files_with_a_reason(env, case):
    world, repo, settings, sp, store = env
    make, expected = BAD[case]
    content = make(repo)
    path = sp.write(content)
    result = intake(sp, store, settings)

    assert result.accepted == [] and result.rejected == [path.name]
    assert all_jobs(store) == []
    assert listing(sp.incoming) == []
    assert listing(sp.accepted) == []
    assert listing(sp.rejected) == sorted([path.name, f"{path.name}.error.json"])
    assert (sp.rejected / path.name).read_bytes() == content  # the file itself is kept, unchanged
    report = json.loads((sp.rejected / f"{path.name}.error.json").read_text())
    assert isinstance(report["error"], str) and expected in report["error"]
    assert report["file"] == path.name
    assert listing(sp.tmp) == []


def test_intake_rejects_root_owned_workspace(env):
    world, repo, settings, sp, store = env
    rooty = world.repos / "rooty"
    rooty.mkdir()
    path = sp.write(job_json(rooty))
    intake(sp, store, settings)
    report = json.loads((sp.rejected / f"{path.name}.error.json").read_text())
    assert "owned by root" in report["error"]


def test_one_bad_file_does_not_stop_the_others(env):
    world, repo, settings, sp, store = env
    good1 = sp.write(job_json(repo, id="g1"))
    bad = sp.write(b"nonsense")
    good2 = sp.write(job_json(repo, id="g2"))
    result = intake(sp, store, settings)
    assert result.accepted == ["g1", "g2"] and result.rejected == [bad.name]
    assert listing(sp.accepted) == sorted([good1.name, good2.name])


def test_duplicate_id_in_a_second_file_is_rejected(env):
    world, repo, settings, sp, store = env
    first = sp.write(job_json(repo, id="dup", prompt="first"))
    second = sp.write(job_json(repo, id="dup", prompt="second"))
    result = intake(sp, store, settings)
    assert result.accepted == ["dup"] and result.rejected == [second.name]
    assert store.get("dup").prompt == "first" and store.get("dup").spool_name == first.name
    report = json.loads((sp.rejected / f"{second.name}.error.json").read_text())
    assert "already exists" in report["error"]


# ---------------------------------------------------------------------------------------------
# crash safety and name reuse


def test_crash_after_commit_before_move_finishes_the_move_only(env):
    world, repo, settings, sp, store = env
    path = sp.write(job_json(repo, id="crashy"))
    # what intake did before the crash: the job row is committed, the file did not move
    from executor.intake.jobs import parse_spec, validate

    valid = validate(parse_spec(path.read_bytes()), settings)
    store.add_job(spool_mod.job_from(valid, path.name))
    assert listing(sp.incoming) == [path.name]

    result = intake(sp, store, settings)
    assert result.rejected == []
    assert [j.id for j in all_jobs(store)] == ["crashy"]
    assert listing(sp.incoming) == []
    assert listing(sp.accepted) == [path.name]
    assert listing(sp.rejected) == []


def test_crash_after_commit_of_a_file_without_id_makes_no_second_job(env):
    """Without an id in the file a re-read would invent a new one: only the spool name links them."""
    world, repo, settings, sp, store = env
    path = sp.write(job_json(repo))
    from executor.intake.jobs import parse_spec, validate

    valid = validate(parse_spec(path.read_bytes()), settings)
    store.add_job(spool_mod.job_from(valid, path.name))

    intake(sp, store, settings)
    assert [j.id for j in all_jobs(store)] == [valid.id]
    assert listing(sp.accepted) == [path.name]
    assert listing(sp.incoming) == []


def test_reused_name_of_an_accepted_file_becomes_a_job_of_its_own(env):
    world, repo, settings, sp, store = env
    sp.write(job_json(repo, id="first", prompt="one"), name="job.json")
    intake(sp, store, settings)
    sp.write(job_json(repo, id="second", prompt="two"), name="job.json")
    result = intake(sp, store, settings)

    assert result.accepted == ["second"]
    assert sorted(j.id for j in all_jobs(store)) == ["first", "second"]
    assert store.get("first").spool_name == "job.json"
    second_name = store.get("second").spool_name
    assert second_name != "job.json"
    assert (sp.accepted / "job.json").read_bytes() == job_json(repo, id="first", prompt="one")  # not clobbered
    assert (sp.accepted / second_name).read_bytes() == job_json(repo, id="second", prompt="two")
    assert listing(sp.incoming) == []


def test_reused_name_without_ids_is_not_swallowed(env):
    world, repo, settings, sp, store = env
    sp.write(job_json(repo, prompt="one"), name="job.json")
    intake(sp, store, settings)
    sp.write(job_json(repo, prompt="two"), name="job.json")
    intake(sp, store, settings)
    assert sorted(j.prompt for j in all_jobs(store)) == ["one", "two"]
    assert len(listing(sp.accepted)) == 2 and listing(sp.incoming) == []


def test_reused_name_with_a_duplicate_id_is_rejected_visibly(env):
    world, repo, settings, sp, store = env
    sp.write(job_json(repo, id="same", prompt="one"), name="job.json")
    intake(sp, store, settings)
    sp.write(job_json(repo, id="same", prompt="two"), name="job.json")
    result = intake(sp, store, settings)

    assert result.accepted == [] and len(result.rejected) == 1
    (rejected_name,) = result.rejected
    assert (sp.rejected / rejected_name).read_bytes() == job_json(repo, id="same", prompt="two")
    report = json.loads((sp.rejected / f"{rejected_name}.error.json").read_text())
    assert "already exists" in report["error"]
    assert store.get("same").prompt == "one"
    assert (sp.accepted / "job.json").read_bytes() == job_json(repo, id="same", prompt="one")


def test_reused_name_of_a_rejected_file_keeps_both_rejected_files(env):
    """A job file is never deleted: a second bad file of the same name must not replace the first."""
    world, repo, settings, sp, store = env
    sp.write(b"first bad file", name="job.json")
    intake(sp, store, settings)
    sp.write(b"second bad file", name="job.json")
    intake(sp, store, settings)
    kept = {(sp.rejected / n).read_bytes() for n in listing(sp.rejected) if not n.endswith(".error.json")}
    assert kept == {b"first bad file", b"second bad file"}
    reports = [n for n in listing(sp.rejected) if n.endswith(".error.json")]
    assert len(reports) == 2


# ---------------------------------------------------------------------------------------------
# hostile entries


def _intake_in_thread(sp, store, settings, timeout=20.0):
    """Run intake where a blocking open would hang, and fail instead of hanging the suite."""
    out: dict = {}

    def run():
        try:
            out["result"] = intake(sp, store, settings)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "intake blocked"
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_symlink_is_rejected_and_not_followed(env, tmp_path):
    world, repo, settings, sp, store = env
    target = tmp_path / "outside-job.json"
    target.write_bytes(job_json(repo, id="via-link"))
    os.symlink(target, sp.incoming / "link.json")
    result = _intake_in_thread(sp, store, settings)

    assert result.rejected == ["link.json"] and result.accepted == []
    assert store.get("via-link") is None
    assert (sp.rejected / "link.json").is_symlink()  # the link itself moved, not its target
    assert target.read_bytes() == job_json(repo, id="via-link")
    report = json.loads((sp.rejected / "link.json.error.json").read_text())
    assert "symlink" in report["error"]


def test_dangling_symlink_is_rejected(env):
    world, repo, settings, sp, store = env
    os.symlink("/nonexistent/job.json", sp.incoming / "dangling.json")
    result = _intake_in_thread(sp, store, settings)
    assert result.rejected == ["dangling.json"]
    assert (sp.rejected / "dangling.json").is_symlink()


def test_fifo_is_rejected_without_blocking(env):
    world, repo, settings, sp, store = env
    os.mkfifo(sp.incoming / "pipe.json")
    result = _intake_in_thread(sp, store, settings)
    assert result.rejected == ["pipe.json"]
    assert stat.S_ISFIFO(os.lstat(sp.rejected / "pipe.json").st_mode)
    report = json.loads((sp.rejected / "pipe.json.error.json").read_text())
    assert "not a regular file" in report["error"]
    assert all_jobs(store) == []


def test_directory_is_rejected(env):
    world, repo, settings, sp, store = env
    (sp.incoming / "adir.json").mkdir()
    (sp.incoming / "adir.json" / "inner.json").write_bytes(job_json(repo, id="inner"))
    result = _intake_in_thread(sp, store, settings)
    assert result.rejected == ["adir.json"]
    assert (sp.rejected / "adir.json" / "inner.json").exists()  # moved whole, not read into
    assert store.get("inner") is None
    report = json.loads((sp.rejected / "adir.json.error.json").read_text())
    assert "not a regular file" in report["error"]


def test_file_over_1_mib_is_rejected(env):
    world, repo, settings, sp, store = env
    body = job_json(repo, id="huge", prompt="x" * (MAX_JOB_FILE + 10))
    assert len(body) > MAX_JOB_FILE
    path = sp.write(body)
    result = intake(sp, store, settings)
    assert result.rejected == [path.name]
    assert store.get("huge") is None
    report = json.loads((sp.rejected / f"{path.name}.error.json").read_text())
    assert "1 MiB" in report["error"]
    assert (sp.rejected / path.name).stat().st_size == len(body)


def test_file_of_exactly_1_mib_is_accepted(env):
    world, repo, settings, sp, store = env
    head = job_json(repo, id="big-ok")
    body = head + b" " * (MAX_JOB_FILE - len(head))
    assert len(body) == MAX_JOB_FILE
    sp.write(body)
    result = intake(sp, store, settings)
    assert result.accepted == ["big-ok"]


def test_reused_name_of_a_rejected_dangling_symlink_keeps_both(env):
    world, repo, settings, sp, store = env
    os.symlink("/nonexistent/a", sp.incoming / "x.json")
    intake(sp, store, settings)
    os.symlink("/nonexistent/b", sp.incoming / "x.json")
    intake(sp, store, settings)
    targets = {os.readlink(sp.rejected / n) for n in listing(sp.rejected) if not n.endswith(".error.json")}
    assert targets == {"/nonexistent/a", "/nonexistent/b"}


# ---------------------------------------------------------------------------------------------
# hostile input: nothing one file does stops intake


def test_deeply_nested_file_is_rejected_and_intake_goes_on(env):
    """200,000 nested brackets (under 1 MiB) made recording the refusal raise RecursionError out of intake."""
    world, repo, settings, sp, store = env
    nested = sp.write(b"[" * 200_000 + b"]" * 200_000)
    nested_object = sp.write(b'{"id": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    good = sp.write(job_json(repo, id="after-the-bomb"))
    result = intake(sp, store, settings)
    assert result.accepted == ["after-the-bomb"]
    assert result.rejected == [nested.name, nested_object.name]
    for path in (nested, nested_object):
        report = json.loads((sp.rejected / f"{path.name}.error.json").read_text())
        assert "recursion" in report["error"] and "JSON" in report["error"]
    assert listing(sp.accepted) == [good.name] and listing(sp.incoming) == []
    assert store.get("deep") is None  # its id could not be read safely, so it names no job


def test_names_that_are_not_plain_are_taken_under_a_fresh_name(env):
    """A name that is not UTF-8, or too long to carry ``.error.json``, must neither crash intake nor be lost."""
    world, repo, settings, sp, store = env
    undecodable = os.fsdecode(b"job-\xff\xfe.json")
    long_bad = "x" * 250  # NAME.error.json would pass the 255-byte limit of a file name
    (sp.incoming / undecodable).write_bytes(job_json(repo, id="from-binary-name"))
    (sp.incoming / long_bad).write_bytes(b"not json")
    result = intake(sp, store, settings)
    assert result.accepted == ["from-binary-name"] and len(result.rejected) == 1
    kept = store.get("from-binary-name").spool_name
    assert kept.isprintable() and kept.isascii() and kept in listing(sp.accepted)
    rejected = result.rejected[0]
    assert len(rejected) < 200 and rejected.endswith("x" * 80)
    assert (sp.rejected / rejected).read_bytes() == b"not json"
    assert (sp.rejected / f"{rejected}.error.json").is_file()
    assert listing(sp.incoming) == []


QUARANTINE_PROBE = r"""
import os, signal, sys
from pathlib import Path
from executor.intake.spool import Spool, intake
from executor.settings import Settings
from executor.store import Store

target = sys.argv[1]
def die_on_reading(event, args):
    # the process dies the moment it opens the poisoned file: what a segfault in a parser looks like from outside
    if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).endswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(die_on_reading)
settings = Settings()
intake(Spool(settings.spool_dir), Store(settings.db_url), settings)
"""


def test_a_file_that_killed_the_process_is_quarantined_at_the_next_start(env, tmp_path):
    world, repo, settings, sp, store = env
    first = sp.write(job_json(repo, id="before"))
    poison = sp.write(job_json(repo, id="poison"))
    after = sp.write(job_json(repo, id="after"))
    probe = tmp_path / "probe.py"
    probe.write_text(QUARANTINE_PROBE)
    import subprocess
    import sys
    died = subprocess.run([sys.executable, str(probe), poison.name],
                          env=world.env(), capture_output=True, timeout=60)
    assert died.returncode == -9, died.stderr.decode()[-2000:]
    assert poison.name in listing(sp.incoming)  # it died reading it: nothing was accepted of its batch

    result = intake(sp, store, settings)
    assert poison.name in result.rejected
    assert sorted(result.accepted) == ["after", "before"]
    report = json.loads((sp.rejected / f"{poison.name}.error.json").read_text())
    assert "stopped the executor" in report["error"]
    assert (sp.rejected / poison.name).read_bytes() == job_json(repo, id="poison")  # kept whole, unread
    assert store.get("poison") is None
    assert not sp.reading.exists()
    assert listing(sp.accepted) == sorted([first.name, after.name])


def test_a_clean_run_leaves_no_reading_mark(env):
    world, repo, settings, sp, store = env
    sp.write(job_json(repo, id="one"))
    sp.write(b"[" * 5000)
    intake(sp, store, settings)
    assert not sp.reading.exists()
    assert intake(sp, store, settings).rejected == []  # nothing is quarantined by a mark left behind


def test_pending_holds_only_the_oldest_window(tmp_path):
    sp = Spool(tmp_path / "spool")
    names = [f"{n:05d}.json" for n in range(50)]
    for name in reversed(names):
        (sp.incoming / name).write_bytes(b"{}")
    assert sp.pending(limit=7) == names[:7]
    assert sp.pending() == names
