"""The disk cap attacked by a hostile job (issue 18): every layer the executor builds for a job lives on an ext4
image of its policy's ``disk`` size, so space a measurement could not see still counts and the writer gets
ENOSPC at the cap. Each attack runs with ``disk = "1g"`` on a state root that is a filesystem of its own
(sampled throughout: the machine's disk is shared with other work, this one is the test's alone), whose free
space must never drop by more than the cap and a small margin:

1. a deleted file held open (a tree walk measured 4 KiB while it held 2 GiB);
2. ``fallocate`` of 3 GB and a write into the home, both within one measuring interval;
3. a 2 GiB sparse file under tests/ with ``evaluation = "tests"`` (the tests-only layer filled its holes).

Then the life of an image: none left mounted or bound after success, rollback and retention; the start-up
sweep finds what a crash left (a mount, a loop device, a probe) and removes it. The hand-over of a reviewed
change is in ``test_review.py``, recovery after SIGKILL in ``tests/acceptance/test_restart.py``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

from executor.errors import ConfigError
from executor.sandbox.disk import FsMeter, TreeMeter, meter_for
from executor.settings import Settings
from executor.store import Status
from executor.transaction import jobdisk, loopmount
from executor.transaction.retention import remove_expired
from tests.conftest import (
    _check_containers,
    assert_no_disk_leftovers,
    disk_leftovers,
    release_disks,
    tree_digest,
    wait_for,
    wait_status,
)
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.stalled,
           Status.awaiting_review}
CAP = 2**30
#: What else the state root takes while a job runs: the store, the status snapshot, the carried transcript,
#: the image's own metadata beyond its data (never more than the image's size in all).
MARGIN = 64 * 2**20
STATE_FS = 6 * 2**30
PYTEST = 'python3 -m pytest -q -p no:cacheprovider --junitxml="$EXECUTOR_JUNIT_XML"'


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


@pytest.fixture
def state_fs(world, tmp_path):
    """The state root on a filesystem of its own (an ext4 image of 6 GiB): its free space is this test's."""
    image = tmp_path / "state-root.img"
    loopmount.make(image, STATE_FS)
    fd = loopmount.open_image(image)
    try:
        loopmount.mount(fd, world.home)
    finally:
        os.close(fd)
    yield world.home
    try:
        _check_containers(world)  # before the store on this filesystem goes with it
    finally:
        release_disks(world.home)
        loopmount.unmount(world.home)
        image.unlink()


class FreeSpace:
    """Samples the free space of ``path``'s filesystem every 20 ms; ``drop``: the most it fell below the first
    sample."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first = self.least = self._free()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="free-space")

    def _free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.least = min(self.least, self._free())
            self.samples += 1

    def __enter__(self) -> FreeSpace:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.least = min(self.least, self._free())

    @property
    def drop(self) -> int:
        return self.first - self.least


def run_one(world, run_executor, job_id: str, script: list[Turn], policy: str, timeout: float = 300, **job):
    """Run one job to its end while the state root's free space is sampled; (job, free space, its store). The
    executor serves on until the test ends."""
    repo = job.pop("repo", None) or world.repo(job_id, {"a.txt": "a\n"})
    with ScriptedAPI({job_id: script}) as api:
        world.write_runners(api.base_url)
        with FreeSpace(world.home) as free:
            # No disk reserve: on this small filesystem it would stop the job first (test_containment.py has it).
            running = run_executor(world.settings(disk_reserve=0))
            world.submit(id=job_id, workspace=str(repo), prompt=f"{job_id}: do it", policy=policy, **job)
            settled = wait_status(running.executor.store, job_id, SETTLED, timeout=timeout)
    assert free.samples > 10
    return settled, free, running.executor.store


def in_use(error: str) -> float:
    """The figure a disk_limit error gives, in MiB."""
    found = re.search(r"\(([\d.]+) (MiB|GiB) in use", error)
    assert found, error
    return float(found.group(1)) * (1024 if found.group(2) == "GiB" else 1)


# ------------------------------------------------------------------------- 1. a deleted file held open


HOLD = ("python3 -c \"import os, time\n"
        "f = open('held.bin', 'wb', buffering=0)\n"
        "os.unlink('held.bin')\n"
        "try:\n"
        "    for _ in range(2048):\n"
        "        f.write(bytes(1 << 20))\n"
        "except OSError as exc:\n"
        "    print('write failed:', exc)\n"
        "time.sleep(16)\"")


def test_a_deleted_file_held_open_fills_the_jobs_disk_not_the_host(world, state_fs, run_executor):
    world.write_policy("small", disk="1g", heartbeat_interval="1s")
    repo = world.repo("unlinked", {"a.txt": "a\n"})
    before = tree_digest(repo)
    job, free, store = run_one(world, run_executor, "unlinked", [bash(HOLD), Turn.text("Done.")], "small",
                                  repo=repo)
    assert (job.status, job.reason) == (Status.failed, "disk_limit"), (job.reason, job.error)
    assert "filled the job's disk, the policy's disk limit of 1g" in job.error
    assert in_use(job.error) > 900  # the 2 GiB written into a file no directory names, up to the cap
    assert free.drop <= CAP + MARGIN, free.drop
    assert tree_digest(repo) == before and not (world.home / "jobs" / "unlinked").exists()


# ------------------------------------------------------------------- 2. fallocate and a fast writer


def test_fallocate_and_a_write_into_the_home_within_one_interval_stop_at_the_cap(world, state_fs, run_executor):
    world.write_policy("small", disk="1g", heartbeat_interval="1s")
    repo = world.repo("falloc", {"a.txt": "a\n"})
    before = tree_digest(repo)
    grab = ("fallocate -l 3G big.bin; echo fallocate exit $?; "
            "dd if=/dev/zero of=$HOME/big.bin bs=1M count=1024 2>&1 | tail -1; sleep 10")
    job, free, store = run_one(world, run_executor, "falloc", [bash(grab), Turn.text("Done.")], "small",
                                  repo=repo, session_id="s-falloc")
    assert (job.status, job.reason) == (Status.failed, "disk_limit"), (job.reason, job.error)
    assert "filled the job's disk" in job.error and in_use(job.error) > 900
    assert free.drop <= CAP + MARGIN, free.drop
    assert tree_digest(repo) == before
    assert not any(p.name == "big.bin" for p in (world.home / "sessions" / "s-falloc").rglob("*"))


def test_a_job_that_uses_up_its_inodes_has_a_full_disk_too(world, run_executor):
    """A 128 MiB disk has 16,384 inodes (one per 8 KiB): empty files exhaust them with the bytes still free."""
    world.write_policy("tiny", disk="128m", heartbeat_interval="1s")
    spray = "python3 -c \"import time\nfor i in range(20000):\n    open('f%d' % i, 'w').close()\n\" ; sleep 8"
    with ScriptedAPI({"inodes": [bash(spray), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        world.submit(id="inodes", workspace=str(world.repo("inodes")), prompt="inodes: do it", policy="tiny")
        job = wait_status(running.executor.store, "inodes", SETTLED, timeout=180)
    assert (job.status, job.reason) == (Status.failed, "disk_limit"), (job.reason, job.error)
    assert "used up the inodes of the job's disk, the policy's disk limit of 128m" in job.error, job.error


# --------------------------------------------------------------------- 3. a sparse file under tests/


CALC = "def sub(a, b):\n    return a + b\n"
FIXED = "def sub(a, b):\n    return a - b\n"
TEST = "import calc\n\n\ndef test_sub():\n    assert calc.sub(5, 3) == 2\n"


def test_a_sparse_test_file_stays_sparse_in_the_tests_only_layer_and_the_commit(world, state_fs, run_executor):
    # Each run prints how many blocks the sparse file holds in its view (the tests-only run: the copy).
    command = f"{PYTEST}; rc=$?; stat -c 'view blocks=%b' tests/fixture.bin 2>/dev/null; exit $rc"
    world.write_policy("graded", disk="1g", evaluation="tests", review="never", protected_paths=[],
                       test_command=command)
    repo = world.repo("sparse", {"calc.py": CALC, "tests/test_calc.py": "def test_nothing():\n    pass\n"})
    script = [bash(f"printf '{FIXED}' > calc.py && printf '{TEST}' > tests/test_sub.py && "
                   "truncate -s 2G tests/fixture.bin && stat -c 'agent blocks=%b' tests/fixture.bin"),
              Turn.text("Fixed sub, tested it, added a fixture.")]
    job, free, store = run_one(world, run_executor, "sparse", script, "graded", repo=repo)
    assert job.status == Status.succeeded, (job.reason, job.error, job.evaluation)
    runs = {e.data["run"]: e.data for e in store.events(job_id="sparse") if e.kind == "test_run"}
    assert set(runs) == {"after", "before", "tests-only"}
    assert "view blocks=0" in runs["tests-only"]["output_tail"], runs["tests-only"]  # copied with its holes
    committed = (repo / "tests" / "fixture.bin").stat()
    assert committed.st_size == 2 * 2**30 and committed.st_blocks == 0  # committed with its holes too
    assert (repo / "calc.py").read_text() == FIXED
    assert free.drop <= CAP + MARGIN, free.drop
    assert_no_disk_leftovers(world.home)  # committed: its image unmounted and its loop device released


# ----------------------------------------------------------------------------------- 4. lifecycle


def test_no_image_stays_mounted_after_success_rollback_or_retention(world, run_executor):
    """Three jobs at once on small disks: one commits, one fails its tests (rolled back), one conflicts (its
    change kept for inspection, its image mounted until retention removes it)."""
    world.write_policy(disk="256m", test_command="test ! -f fail.txt")
    repos = {name: world.repo(name, {"shared.txt": "old\n"}) for name in ("life-ok", "life-bad", "life-kept")}
    script = {"life-ok": [bash("echo ok > new.txt"), Turn.text("Done.")],
              "life-bad": [bash("echo bad > fail.txt"), Turn.text("Done.")],
              "life-kept": [bash("echo job > shared.txt; sleep 4"), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        store = running.executor.store
        for name, repo in repos.items():
            world.submit(id=name, workspace=str(repo), prompt=f"{name}: do it")
        wait_for(lambda: any(e.kind == "tool_call" for e in store.events(job_id="life-kept")), 120,
                 "life-kept's tool call")
        assert os.path.ismount(world.home / "jobs" / "life-kept" / "layers")  # its disk, while it runs
        (repos["life-kept"] / "shared.txt").write_text("a person's edit\n")  # the job's change now conflicts
        jobs = {name: wait_status(store, name, SETTLED, timeout=180) for name in repos}
        assert jobs["life-ok"].status == Status.succeeded, jobs["life-ok"].error
        assert (jobs["life-bad"].status, jobs["life-bad"].reason) == (Status.rolled_back, "tests_failed")
        assert (jobs["life-kept"].status, jobs["life-kept"].reason) == (Status.failed, "conflict")
        kept = Path(os.path.realpath(world.home / "jobs" / "life-kept"))
        leftovers = wait_for(lambda: found if len(found := disk_leftovers(world.home)) == 2 else None, 10,
                             "the loop devices of the other two jobs to be released")
        mounts = [d for d in leftovers if not d.startswith("/dev/loop")]
        loops = [d for d in leftovers if d.startswith("/dev/loop")]
        # only the kept change's disk: its mount and its loop device
        assert mounts == [str(kept / "layers")] and len(loops) == 1 and str(kept / "layers.img") in loops[0]
        assert (kept / "layers" / "upper" / "shared.txt").read_text() == "job\n"
        remove_expired(world.settings(retention=0.001), store)  # its time is up
        assert_no_disk_leftovers(world.home)
        assert not kept.exists()


def test_the_start_up_sweep_removes_what_a_crash_left_mounted_or_bound(world, run_executor):
    jobs = world.home / "jobs"
    # A job dir no job owns, its image mounted (a crash before the store knew of the job) ...
    ghost = jobs / "ghost"
    ghost.mkdir(parents=True)
    loopmount.make(ghost / "layers.img", 64 * 2**20)
    (ghost / "layers").mkdir()
    _mount(ghost / "layers.img", ghost / "layers")
    # ... a mount whose image is gone ...
    gone = jobs / "gone"
    gone.mkdir()
    loopmount.make(gone / "layers.img", 64 * 2**20)
    (gone / "layers").mkdir()
    _mount(gone / "layers.img", gone / "layers")
    os.unlink(gone / "layers.img")
    # ... a loop device bound to an image nothing mounts (no autoclear: losetup's own) ...
    stray = jobs / "stray"
    stray.mkdir()
    loopmount.make(stray / "layers.img", 64 * 2**20)
    bound = subprocess.run(["losetup", "--show", "-f", str(stray / "layers.img")], capture_output=True, text=True)
    assert bound.returncode == 0, bound.stderr
    # ... and a start-up probe cut off half-way.
    probe = world.home / ".disk-probe-dead"
    probe.mkdir()
    loopmount.make(probe / "layers.img", 64 * 2**20)
    (probe / "layers").mkdir()
    _mount(probe / "layers.img", probe / "layers")
    assert len(disk_leftovers(world.home)) == 7  # three mounts, four loop devices
    with ScriptedAPI({}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        wait_for(lambda: running.executor.last_tick, 60, "the executor's first tick (after its recovery)")
        assert_no_disk_leftovers(world.home)
        assert not ghost.exists() and not gone.exists() and not stray.exists() and not probe.exists()
        assert running.executor.disk.images  # and its own probe left nothing either
        assert not list(world.home.glob(".disk-probe-*"))


def _mount(image: Path, target: Path) -> None:
    fd = loopmount.open_image(image)
    try:
        loopmount.mount(fd, target)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- the fallback, said


def test_the_watchdog_fallback_is_chosen_by_setting_and_said_by_status(world, run_executor):
    world.write_policy(disk="256m")
    with ScriptedAPI({"plain": [bash("echo hi > hi.txt"), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings(disk_cap="watchdog"))
        world.submit(id="plain", workspace=str(world.repo("plain")), prompt="plain: do it")
        wait_for(lambda: any(e.kind == "tool_call" for e in running.executor.store.events(job_id="plain")), 120,
                 "the tool call")
        layers = world.home / "jobs" / "plain" / "layers"
        assert layers.is_dir() and not os.path.ismount(layers) and not (layers.parent / "layers.img").exists()
        job = wait_status(running.executor.store, "plain", SETTLED)
        assert job.status == Status.succeeded, job.error
        wait_for(lambda: json.loads((world.home / "status.json").read_text())["measured"]["disk"].get("cap"), 30,
                 "the snapshot")
    status = json.loads((world.home / "status.json").read_text())
    assert status["measured"]["disk"]["cap"] == "watchdog"
    assert running.executor.disk.mode == "watchdog" and "EXECUTOR_DISK_CAP=watchdog" in running.executor.disk.why
    assert_no_disk_leftovers(world.home)


# ------------------------------------------------------------------ the image's own life, without a job


def test_the_meter_of_a_disk_image_counts_a_deleted_file_held_open_where_a_walk_sees_nothing(tmp_path):
    root = tmp_path / "job"
    jobdisk.prepare(root, 64 * 2**20, keep=False)
    layers = root / "layers"
    try:
        assert os.path.ismount(layers) and isinstance(meter_for(layers, 64 * 2**20), FsMeter)
        held = open(layers / "held.bin", "wb", buffering=0)
        os.unlink(layers / "held.bin")
        with pytest.raises(OSError) as full:
            while True:
                held.write(bytes(1 << 20))
        assert full.value.errno == errno.ENOSPC  # the writer is refused at the cap
        image, walk = FsMeter(layers, 64 * 2**20), TreeMeter([layers], 64 * 2**20)
        assert image.measure() > 40 * 2**20 and image.full == "space" and image.over
        assert walk.measure() < 2**20 and not walk.over  # what the watchdog alone would have seen
        held.close()
        assert image.measure() < 2**20 and not image.over  # closed: the space is free again
    finally:
        jobdisk.remove(root)
    assert_no_disk_leftovers(tmp_path)
    assert not root.exists()


def test_a_busy_disk_is_detached_and_released_when_its_last_user_goes(tmp_path):
    root = tmp_path / "job"
    jobdisk.prepare(root, 64 * 2**20, keep=False)
    user = open(root / "layers" / "open.txt", "w")  # e.g. a person's shell in the kept change
    jobdisk.remove(root)  # busy: detached lazily, never a stranded directory
    assert not root.exists()
    assert [lo for lo in loopmount.loops() if Path(os.path.realpath(tmp_path)) in lo.backing.parents]  # in use
    user.close()
    wait_for(lambda: disk_leftovers(tmp_path) == [], 10, "the loop device to go with its last user")


def test_a_handed_over_image_busy_at_its_old_place_is_mounted_from_the_same_loop_device(tmp_path):
    base, follow = tmp_path / "reviewed", tmp_path / "follow-up"
    jobdisk.prepare(base, 64 * 2**20, keep=False)
    (base / "layers" / "upper").mkdir()
    (base / "layers" / "upper" / "change.txt").write_text("kept\n")
    (base / "layers" / "home").mkdir()  # the reviewed job's home layer: not the follow-up's
    user = open(base / "layers" / "upper" / "change.txt")  # keeps the old mount busy
    try:
        assert jobdisk.hand_over(base, follow)
        assert (follow / "layers" / "upper" / "change.txt").read_text() == "kept\n"
        assert sorted(os.listdir(follow / "layers")) == ["lost+found", "upper"]
        bound = [lo for lo in loopmount.loops() if Path(os.path.realpath(tmp_path)) in lo.backing.parents]
        assert len(bound) == 1  # one image, one filesystem: never mounted twice
        (follow / "layers" / "upper" / "more.txt").write_text("more\n")
        assert user.read() == "kept\n"
    finally:
        user.close()
        jobdisk.remove(follow)
        jobdisk.remove(base)
    wait_for(lambda: disk_leftovers(tmp_path) == [], 10, "every mount and loop device to go")


def test_images_are_refused_where_the_engine_would_not_see_them_and_image_mode_then_refuses_to_start(tmp_path):
    """In a container, the state root's mount must propagate to the host (rshared); a private one means the
    engine would mount the plain directory under the image: auto falls back, ``image`` refuses."""
    home = tmp_path / "home"
    home.mkdir()
    subprocess.run(["mount", "--bind", str(home), str(home)], check=True)
    try:
        subprocess.run(["mount", "--make-private", str(home)], check=True)
        settings = Settings(home=home)
        chosen = jobdisk.decide(settings, in_container=True)
        assert chosen.mode == "watchdog" and "not rshared" in chosen.why and "rshared" in chosen.fix
        assert jobdisk.decide(settings, in_container=False).mode == "image"  # on the host it is possible
        with pytest.raises(ConfigError, match="EXECUTOR_DISK_CAP=image, but the state root's mount"):
            jobdisk.decide(Settings(home=home, disk_cap="image"), in_container=True)
    finally:
        loopmount.unmount(home)
    assert not list(home.glob(".disk-probe-*"))  # the probes cleaned up after themselves


def test_a_change_kept_in_the_layout_before_disk_images_is_found_after_the_upgrade(tmp_path):
    """A job awaiting review across the upgrade kept ``jobs/<id>/upper``; recovery moves it into ``layers/``."""
    root = tmp_path / "jobs" / "old-review"
    (root / "upper").mkdir(parents=True)
    (root / "upper" / "hello.txt").write_text("changed\n")
    (root / "home" / "upper").mkdir(parents=True)
    (root / "sock").mkdir()
    (root / "commit-journal.json").write_text("{}")
    assert jobdisk.attach_all(tmp_path / "jobs") == []  # nothing to mount: a plain directory, as before
    assert (root / "layers" / "upper" / "hello.txt").read_text() == "changed\n"
    assert (root / "layers" / "home" / "upper").is_dir()
    assert sorted(os.listdir(root)) == ["commit-journal.json", "layers", "sock"]
    assert isinstance(meter_for(root / "layers", 2**30), TreeMeter)  # measured by the watchdog, as it was
