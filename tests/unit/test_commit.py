"""Tests for executor.transaction (upper, conflicts, apply): scanning an overlay upper dir, the conflict check, and applying.

The upper dirs are built by hand the way overlayfs (mounted with ``userxattr``) leaves them:
whiteouts are 0/0 character devices, opaque dirs carry ``user.overlay.opaque=y``. Needs root
(mknod, chown) and a filesystem with user xattrs (ext4 and tmpfs have them).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from executor.errors import UnsafePath
from executor.transaction import apply as apply_mod
from executor.transaction import conflicts as conflicts_mod
from executor.transaction.safefs import remove_tree
from executor.transaction.upper import Change, Entry, scan_upper
from tests.conftest import chown_tree
from tests.unit.upper_tree import opaque, own_dirs, require_root, require_user_xattrs, whiteout, write


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()

UID = GID = 1000


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def base(tmp_path: Path) -> Path:
    require_user_xattrs(tmp_path)
    return tmp_path


@pytest.fixture
def repo(base: Path) -> Path:
    r = base / "repo"
    write(r / "README.md", "hello\n")
    write(r / "src/app.py", "print('app')\n")
    write(r / "src/util.py", "def f(): pass\n")
    write(r / "old/a.txt", "a\n")
    write(r / "old/deep/b.txt", "b\n")
    write(r / "docs/guide.md", "guide\n")
    write(r / ".git/config", "[core]\n")
    write(r / ".git/HEAD", "ref: refs/heads/main\n")
    chown_tree(r, UID)  # a repository belongs to its owner (intake refuses a root-owned one)
    return r


@pytest.fixture
def upper(base: Path) -> Path:
    u = base / "upper"
    u.mkdir()
    return u




def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree that apply is responsible for, never following symlinks."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_uid, st.st_gid)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, digest)
            else:
                out[rel] = ("other", st.st_mode, st.st_rdev)
    return out


def tree_hash(root: Path) -> str:
    return hashlib.sha256(repr(sorted(snapshot(root).items())).encode()).hexdigest()


def apply_change(change: Change, upper: Path, repo: Path, uid: int, gid: int, journal: Path | None = None) -> None:
    """``apply_change`` on the repository's directory fd, as the pipeline calls it."""
    own_dirs(upper)
    fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        apply_mod.apply_change(change, upper, fd, uid, gid, journal)
    finally:
        os.close(fd)


def check_conflicts(change: Change, repo: Path, since: int) -> list[str]:
    fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return conflicts_mod.check_conflicts(change, fd, since)
    finally:
        os.close(fd)


def commit(upper: Path, repo: Path) -> Change:
    change = scan_upper(upper)
    apply_change(change, upper, repo, UID, GID)
    return change


def started() -> int:
    """A job start time safely after everything the fixtures wrote (see CLOCK_SLACK_NS)."""
    time.sleep(0.05)
    since = time.time_ns()
    time.sleep(0.05)
    return since


# ---------------------------------------------------------------------------------------------
# scan


def test_scan_lists_entries_parents_first_and_classifies(upper: Path) -> None:
    write(upper / "src/app.py", "x", 0o644)
    os.symlink("app.py", upper / "src/link")
    whiteout(upper / "src/util.py")
    opaque(upper / "old")
    write(upper / "old/new.txt", "n")
    write(upper / ".git/config", "evil")

    change = scan_upper(upper)

    kinds = {e.path: e.kind for e in change.entries}
    assert kinds == {
        "src": "dir",
        "src/app.py": "file",
        "src/link": "symlink",
        "src/util.py": "delete",
        "old": "opaque_dir",
        "old/new.txt": "file",
    }
    order = [e.path for e in change.entries]
    assert order.index("src") < order.index("src/app.py")
    assert order.index("old") < order.index("old/new.txt")
    app = next(e for e in change.entries if e.path == "src/app.py")
    assert (app.mode, app.size) == (0o644, 1)
    assert change.ignored_git == [".git", ".git/config"]
    assert change.refused == []
    assert change.changed_files == ["old", "old/new.txt", "src/app.py", "src/link", "src/util.py"]


def test_scan_treats_xattr_whiteout_as_delete(upper: Path) -> None:
    f = write(upper / "gone.txt", "")
    os.setxattr(f, "user.overlay.whiteout", b"")
    assert scan_upper(upper).entries == [Entry("gone.txt", "delete")]


def test_scan_refuses_devices_fifos_and_sockets(upper: Path) -> None:
    os.mkfifo(upper / "pipe")
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(upper / "disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    change = scan_upper(upper)
    assert sorted(r.path for r in change.refused) == ["disk", "null", "pipe"]
    assert all(r.reason for r in change.refused)
    assert change.entries == []


# ---------------------------------------------------------------------------------------------
# apply


def test_new_file_and_modified_file_with_setuid_stripped(repo: Path, upper: Path) -> None:
    write(upper / "src/new.py", "new\n", 0o640)
    write(upper / "src/app.py", "print('changed')\n", 0o4755)

    commit(upper, repo)

    assert (repo / "src/new.py").read_text() == "new\n"
    assert stat.S_IMODE((repo / "src/new.py").stat().st_mode) == 0o640
    assert (repo / "src/app.py").read_text() == "print('changed')\n"
    assert stat.S_IMODE((repo / "src/app.py").stat().st_mode) == 0o755
    assert (repo / "src/util.py").read_text() == "def f(): pass\n"  # untouched sibling
    assert not [p for p in (repo / "src").iterdir() if p.name.startswith(".commit-tmp")]


def test_new_dir_keeps_permission_bits_drops_setgid(repo: Path, upper: Path) -> None:
    (upper / "pkg/sub").mkdir(parents=True)
    os.chmod(upper / "pkg", 0o2775)
    os.chmod(upper / "pkg/sub", 0o1750)
    write(upper / "pkg/sub/x.txt", "x")

    commit(upper, repo)

    assert stat.S_IMODE((repo / "pkg").stat().st_mode) == 0o775
    assert stat.S_IMODE((repo / "pkg/sub").stat().st_mode) == 0o750
    assert (repo / "pkg/sub/x.txt").read_text() == "x"


def test_ownership_is_set_to_given_uid_gid(repo: Path, upper: Path) -> None:
    write(upper / "pkg/x.txt", "x")
    os.symlink("x.txt", upper / "pkg/link")

    commit(upper, repo)

    for p in (repo / "pkg", repo / "pkg/x.txt", repo / "pkg/link"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (UID, GID), p


def test_whiteouts_delete_a_file_and_a_whole_dir(repo: Path, upper: Path) -> None:
    whiteout(upper / "src/util.py")
    whiteout(upper / "old")

    change = commit(upper, repo)

    assert not (repo / "src/util.py").exists()
    assert (repo / "src/app.py").exists()
    assert not os.path.lexists(repo / "old")
    assert change.changed_files == ["old", "src/util.py"]


def test_whiteout_of_a_dir_holding_a_symlink_out_does_not_follow_it(
    repo: Path, upper: Path, base: Path
) -> None:
    outside = base / "outside"
    write(outside / "keep.txt", "keep")
    os.symlink(outside, repo / "old/escape")
    whiteout(upper / "old")

    commit(upper, repo)

    assert not os.path.lexists(repo / "old")
    assert (outside / "keep.txt").read_text() == "keep"


def test_opaque_dir_replaces_the_old_dir(repo: Path, upper: Path) -> None:
    opaque(upper / "old")
    write(upper / "old/fresh.txt", "fresh")
    (upper / "old/deep").mkdir()

    commit(upper, repo)

    assert sorted(p.name for p in (repo / "old").iterdir()) == ["deep", "fresh.txt"]
    assert list((repo / "old/deep").iterdir()) == []
    assert (repo / "old/fresh.txt").read_text() == "fresh"


def test_opaque_dir_replaces_a_file_or_symlink(repo: Path, upper: Path, base: Path) -> None:
    outside = base / "outside"
    outside.mkdir()
    os.symlink(outside, repo / "was_link")
    opaque(upper / "README.md")
    write(upper / "README.md/inner.txt", "i")
    opaque(upper / "was_link")
    write(upper / "was_link/inner.txt", "j")

    commit(upper, repo)

    assert (repo / "README.md/inner.txt").read_text() == "i"
    assert (repo / "was_link").is_dir() and not (repo / "was_link").is_symlink()
    assert list(outside.iterdir()) == []


def test_type_changes_file_to_dir_and_dir_to_file(repo: Path, upper: Path) -> None:
    write(upper / "docs", "now a file")  # was a dir
    opaque(upper / "src/app.py")  # was a file (overlay marks a dir made over a whiteout opaque)
    write(upper / "src/app.py/main.py", "m")

    commit(upper, repo)

    assert (repo / "docs").read_text() == "now a file"
    assert (repo / "src/app.py/main.py").read_text() == "m"


def test_symlink_to_etc_is_recreated_and_etc_untouched(repo: Path, upper: Path) -> None:
    before = snapshot(Path("/etc"))
    os.symlink("/etc", upper / "etc-link")
    os.symlink("/etc/passwd", upper / "passwd-link")

    commit(upper, repo)

    assert os.readlink(repo / "etc-link") == "/etc"
    assert os.readlink(repo / "passwd-link") == "/etc/passwd"
    assert snapshot(Path("/etc")) == before


def test_symlink_replaces_existing_file_without_writing_through(repo: Path, upper: Path) -> None:
    (upper / "src").mkdir()
    os.symlink("../README.md", upper / "src/app.py")

    commit(upper, repo)

    assert os.readlink(repo / "src/app.py") == "../README.md"
    assert (repo / "README.md").read_text() == "hello\n"


def test_git_paths_are_never_applied(repo: Path, upper: Path) -> None:
    write(upper / ".git/config", "[core]\n\thooksPath = /tmp/evil\n")
    write(upper / ".git/hooks/post-checkout", "#!/bin/sh\nrm -rf ~\n", 0o755)
    whiteout(upper / ".git/HEAD")
    write(upper / "vendor/lib/.git/config", "nested")
    write(upper / "vendor/lib/code.py", "ok")
    git_before = snapshot(repo / ".git")

    change = commit(upper, repo)

    assert snapshot(repo / ".git") == git_before
    assert (repo / "vendor/lib/code.py").read_text() == "ok"
    assert not (repo / "vendor/lib/.git").exists()
    assert ".git/config" in change.ignored_git
    assert ".git/hooks/post-checkout" in change.ignored_git
    assert "vendor/lib/.git/config" in change.ignored_git
    assert not any(".git" in p.split("/") for p in change.changed_files)


def test_hand_built_change_touching_git_is_not_applied(repo: Path, upper: Path) -> None:
    write(upper / ".git/config", "evil")
    change = Change(entries=[Entry(".git", "dir", 0o755), Entry(".git/config", "file", 0o644, 4)])
    apply_change(change, upper, repo, UID, GID)
    assert (repo / ".git/config").read_text() == "[core]\n"


def test_fifo_in_upper_refuses_the_whole_change(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "changed")
    os.mkfifo(upper / "src/pipe")
    before = snapshot(repo)

    change = scan_upper(upper)
    with pytest.raises(UnsafePath) as exc:
        apply_change(change, upper, repo, UID, GID)

    assert "src/pipe" in str(exc.value)
    assert snapshot(repo) == before


def test_device_file_refused_and_never_created(repo: Path, upper: Path) -> None:
    os.mknod(upper / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with pytest.raises(UnsafePath):
        commit(upper, repo)
    assert not os.path.lexists(repo / "null")


def test_dotdot_paths_in_a_hand_built_change_are_refused(repo: Path, upper: Path) -> None:
    for bad in ("../escape", "a/../../escape", "/abs", "a//b", "./x"):
        with pytest.raises(UnsafePath):
            apply_change(Change(entries=[Entry(bad, "delete")]), upper, repo, UID, GID)
    assert (repo / "README.md").exists()


def test_repo_dir_swapped_for_symlink_out_writes_nothing_outside(
    repo: Path, upper: Path, base: Path
) -> None:
    write(upper / "src/new.py", "new")
    write(upper / "src/app.py", "changed")
    outside = base / "outside"
    write(outside / "app.py", "outside original")
    outside_before = snapshot(outside)
    since = started()
    # the person replaces src/ by a symlink to a dir outside the repository during the job
    (repo / "src/app.py").unlink()
    (repo / "src/util.py").unlink()
    (repo / "src").rmdir()
    os.symlink(outside, repo / "src")

    change = scan_upper(upper)
    assert "src/app.py" in check_conflicts(change, repo, since)
    apply_change(change, upper, repo, UID, GID)  # even if the caller applies anyway

    assert snapshot(outside) == outside_before
    assert (repo / "src").is_dir() and not (repo / "src").is_symlink()
    assert (repo / "src/new.py").read_text() == "new"


def test_hard_links_land_as_independent_files(repo: Path, upper: Path, base: Path) -> None:
    write(upper / "a.txt", "shared")
    os.link(upper / "a.txt", upper / "b.txt")
    # a repo file hard-linked to a file outside: replacing it must not write into that inode
    outside = write(base / "outside.txt", "outside")
    (repo / "README.md").unlink()
    os.link(outside, repo / "README.md")
    write(upper / "README.md", "new readme")

    commit(upper, repo)

    a, b = (repo / "a.txt"), (repo / "b.txt")
    assert a.read_text() == b.read_text() == "shared"
    assert a.stat().st_ino != b.stat().st_ino
    a.write_text("only a")
    assert b.read_text() == "shared"
    assert outside.read_text() == "outside"
    assert (repo / "README.md").read_text() == "new readme"


def test_apply_is_idempotent(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "changed", 0o4755)
    write(upper / "src/new/x.py", "x")
    whiteout(upper / "src/util.py")
    whiteout(upper / "docs")
    opaque(upper / "old")
    write(upper / "old/fresh.txt", "fresh")
    os.symlink("/etc", upper / "etc-link")

    commit(upper, repo)
    first = tree_hash(repo)
    commit(upper, repo)

    assert tree_hash(repo) == first


def test_rerun_after_crash_cleans_up_and_finishes(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "changed")
    opaque(upper / "old")
    write(upper / "old/fresh.txt", "fresh")
    commit(upper, repo)
    expected = tree_hash(repo)

    # simulate a crash: a temp file left behind, a stale child in the opaque dir, old content
    from executor.transaction.apply import _temp_name

    write(repo / "src" / _temp_name("app.py"), "half written")
    write(repo / "src/app.py", "old")
    write(repo / "old/a.txt", "a\n")
    os.chown(repo / "src" / _temp_name("app.py"), UID, GID)
    commit(upper, repo)

    assert tree_hash(repo) == expected


def test_a_large_change_has_its_deletions_on_disk_before_the_journal_says_they_are_done(
        repo: Path, upper: Path, base: Path, monkeypatch) -> None:
    """Beyond FSYNC_EACH files nothing is fsynced one by one: a syncfs must come between the structure phase
    and the journal's ``structure_done``, or a power loss could undo deletions a restart then skips."""
    for i in range(apply_mod.FSYNC_EACH + 1):
        write(upper / f"many/f{i}.txt", str(i))
    whiteout(upper / "docs")
    log: list[str] = []
    real_syncfs, real_save, real_remove = apply_mod.syncfs, apply_mod.save, apply_mod.remove_at
    monkeypatch.setattr(apply_mod, "syncfs", lambda fd: (log.append("syncfs"), real_syncfs(fd))[1])
    monkeypatch.setattr(apply_mod, "save", lambda journal, plan: (
        log.append(f"save done={plan.structure_done}"), real_save(journal, plan))[1])
    monkeypatch.setattr(apply_mod, "remove_at", lambda fd, name: (log.append(f"remove {name}"), real_remove(fd, name))[1])
    apply_change(scan_upper(upper), upper, repo, UID, GID, journal=base / "journal.json")
    assert not (repo / "docs").exists() and (repo / "many/f0.txt").read_text() == "0"
    removed, done = log.index("remove docs"), log.index("save done=True")
    assert removed < done and "syncfs" in log[removed:done], log


# ---------------------------------------------------------------------------------------------
# conflicts


def test_conflict_when_repo_file_changed_after_start(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "job's version")
    since = started()
    write(repo / "src/app.py", "person's version")

    assert check_conflicts(scan_upper(upper), repo, since) == ["src/app.py"]


def test_no_conflict_for_unrelated_repo_change(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "job's version")
    write(upper / "src/brand_new.py", "new")
    since = started()
    write(repo / "docs/guide.md", "person edits something else")
    write(repo / "docs/added.md", "and adds a file elsewhere")

    assert check_conflicts(scan_upper(upper), repo, since) == []


def test_no_conflict_when_nothing_changed(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "job's version")
    whiteout(upper / "old")
    opaque(upper / "docs")
    since = started()
    assert check_conflicts(scan_upper(upper), repo, since) == []


def test_conflict_when_person_deleted_a_file_the_job_modified(repo: Path, upper: Path) -> None:
    write(upper / "src/app.py", "job's version")
    since = started()
    (repo / "src/app.py").unlink()

    assert check_conflicts(scan_upper(upper), repo, since) == ["src/app.py"]


def test_conflict_when_person_deleted_the_dir_holding_a_modified_file(
    repo: Path, upper: Path
) -> None:
    write(upper / "old/deep/b.txt", "job's version")
    since = started()
    (repo / "old/deep/b.txt").unlink()
    (repo / "old/deep").rmdir()

    assert check_conflicts(scan_upper(upper), repo, since) == ["old/deep/b.txt"]


def test_conflict_when_job_deletes_or_replaces_a_dir_the_person_changed(
    repo: Path, upper: Path
) -> None:
    whiteout(upper / "old")
    opaque(upper / "docs")
    write(repo / "docs/sub/deeper.md", "d")
    since = started()
    write(repo / "old/deep/b.txt", "person's edit deep inside")
    write(repo / "docs/sub/deeper.md", "person's edit")

    assert check_conflicts(scan_upper(upper), repo, since) == ["docs", "old"]


def test_conflict_check_only_looks_at_changed_paths(
    repo: Path, upper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        write(repo / f"untouched/d{i}/f.txt", "x")
    write(upper / "src/app.py", "job's version")
    whiteout(upper / "old")
    change = scan_upper(upper)
    seen: list[str] = []
    real_open, real_listdir = os.open, os.listdir

    def where(path, dir_fd):
        # resolve what was opened/listed to an absolute path, through the fds used
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        start = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        return os.path.join(start, os.fsdecode(path))

    def spy_open(path, flags, mode=0o777, *, dir_fd=None):
        seen.append(where(path, dir_fd))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def spy_listdir(path="."):
        seen.append(where(path, None))
        return real_listdir(path)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "listdir", spy_listdir)
    check_conflicts(change, repo, time.time_ns())
    apply_change(change, upper, repo, UID, GID)
    monkeypatch.undo()

    untouched = str(repo / "untouched")
    assert any(p.startswith(str(repo / "src")) for p in seen), "spy saw nothing"
    assert not [p for p in seen if p.startswith(untouched)]
    assert not [p for p in seen if p.startswith(str(repo / "docs"))]


# ---------------------------------------------------------------------------------------------
# remove_tree


def test_remove_tree_handles_whiteouts_fifos_and_symlinks_out(base: Path, upper: Path) -> None:
    outside = base / "outside"
    write(outside / "keep.txt", "keep")
    whiteout(upper / "a/wh")
    os.mkfifo(upper / "a/pipe")
    os.symlink(outside, upper / "a/out")
    (upper / "locked").mkdir(mode=0o000)

    remove_tree(upper)
    remove_tree(upper)  # already gone is fine

    assert not os.path.lexists(upper)
    assert (outside / "keep.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------------
# against the real kernel


def test_apply_reproduces_a_real_overlay_merged_view(base: Path) -> None:
    """Mount overlayfs the way the volume driver does, change things, compare with apply."""
    import subprocess

    lower, up, work, merged = (base / n for n in ("lower", "up", "work", "merged"))
    for d in (up, work, merged):
        d.mkdir()
    write(lower / "d/a.txt", "a")
    write(lower / "e/c.txt", "c")
    write(lower / "f.txt", "f")
    write(lower / "keep.txt", "keep")
    opts = f"lowerdir={lower},upperdir={up},workdir={work},userxattr,metacopy=off,index=off"
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.fail(f"cannot mount overlayfs here (the executor needs it): {mount.stderr.strip()}")
    try:
        (merged / "f.txt").unlink()  # whiteout
        for p in (merged / "e").iterdir():
            p.unlink()
        (merged / "e").rmdir()
        (merged / "e").mkdir()  # dir over a whiteout: opaque
        os.chown(merged / "e", UID, GID)  # as the agent (the repository's owner) would have made it
        write(merged / "e/new.txt", "new")
        with open(merged / "d/a.txt", "a") as fh:  # copy-up
            fh.write("+")
        os.symlink("/etc", merged / "etclink")
        os.lchown(merged / "etclink", UID, GID)
        expected = snapshot(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)

    change = scan_upper(up)
    assert {e.path: e.kind for e in change.entries}["e"] == "opaque_dir"
    apply_change(change, up, lower, UID, GID)

    assert snapshot(lower) == expected
