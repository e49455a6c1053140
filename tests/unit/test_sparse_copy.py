"""Every copy the executor makes of a job-written file keeps its holes: ``safefs.copy_fd`` itself, the commit
into the repository (a job's disk image is its own filesystem, so the commit copies), the graded gate's
tests-only layer and the session carry into the committed home. A sparse file stays sparse (``st_blocks``)
and a copy never holds more blocks than its source: a 1 TiB file of holes written by a job costs the host
nothing when it is copied (before, the byte-by-byte copy filled every hole)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from executor.evaluation.layers import build_tests_layer, split
from executor.policy import DEFAULT_TEST_PATHS
from executor.transaction import home
from executor.transaction.apply import apply_change
from executor.transaction.safefs import copy_fd
from executor.transaction.upper import scan_upper
from tests.unit.upper_tree import OWNER, require_root, require_user_xattrs, write

TIB = 2**40
#: (offset, bytes) of the data a sparse file holds; the rest is holes.
ISLANDS = ((0, b"head\n"), (2**30, b"x" * 300_000), (TIB - 5, b"tail\n"))


@pytest.fixture(autouse=True)
def _root(tmp_path: Path) -> None:
    require_root()
    require_user_xattrs(tmp_path)


def sparse(path: Path, size: int = TIB, islands=ISLANDS) -> Path:
    """A file of ``size`` bytes holding data only at ``islands``, owned by the repository's owner."""
    write(path, b"")
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in islands:
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def assert_same_sparse_file(copy: Path, source: Path) -> None:
    got, want = copy.stat(), source.stat()
    assert got.st_size == want.st_size
    assert got.st_blocks <= want.st_blocks, (got.st_blocks, want.st_blocks)  # never more blocks than the source
    assert got.st_blocks * 512 < 2**20  # a few data blocks of a 1 TiB file: the holes stayed holes
    with open(copy, "rb") as f:
        for offset, data in ISLANDS:
            f.seek(offset)
            assert f.read(len(data)) == data
        f.seek(2**20)  # inside a hole
        assert f.read(4096) == bytes(4096)


def copied(source: Path, target: Path) -> None:
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_fd(src, dst)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_fd_keeps_a_sparse_file_sparse(tmp_path: Path):
    source = sparse(tmp_path / "big")
    copied(source, tmp_path / "copy")
    assert_same_sparse_file(tmp_path / "copy", source)


def test_copy_fd_across_filesystems_keeps_holes_and_copies_dense_data_exactly(tmp_path: Path):
    """From the state root's filesystem to a tmpfs (``/dev/shm``): copy_file_range refuses across them, the
    pread/pwrite fallback still copies only the data ranges."""
    shm = Path("/dev/shm")
    assert shm.is_dir(), "this test copies onto the tmpfs at /dev/shm"
    source = sparse(tmp_path / "big")
    dense = tmp_path / "dense"
    dense.write_bytes(os.urandom(3 * 2**20 + 7))
    targets = [shm / f"executor-sparse-test-{os.getpid()}", shm / f"executor-dense-test-{os.getpid()}"]
    try:
        copied(source, targets[0])
        assert_same_sparse_file(targets[0], source)
        copied(dense, targets[1])
        assert targets[1].read_bytes() == dense.read_bytes()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_copy_fd_of_a_file_of_holes_only_writes_no_block(tmp_path: Path):
    source = sparse(tmp_path / "holes", islands=())
    copied(source, tmp_path / "copy")
    assert (tmp_path / "copy").stat().st_size == TIB and (tmp_path / "copy").stat().st_blocks == 0


def test_the_commit_keeps_a_sparse_file_sparse_in_the_repository(tmp_path: Path):
    repo, upper = tmp_path / "repo", tmp_path / "upper"
    write(repo / "README.md", "hello\n")
    source = sparse(upper / "data" / "big.bin")
    repo_fd = os.open(repo, os.O_RDONLY | os.O_DIRECTORY)
    try:  # no journal: the copying commit (upper and repository on two filesystems, as with a disk image)
        apply_change(scan_upper(upper), upper, repo_fd, OWNER, OWNER)
    finally:
        os.close(repo_fd)
    assert_same_sparse_file(repo / "data" / "big.bin", source)
    assert (repo / "data" / "big.bin").stat().st_uid == OWNER


def test_the_tests_only_layer_keeps_a_sparse_test_file_sparse(tmp_path: Path):
    repo, upper, layer = tmp_path / "repo", tmp_path / "upper", tmp_path / "layer"
    write(repo / "calc.py", "old\n")
    write(upper / "calc.py", "new\n")
    source = sparse(upper / "tests" / "fixture.bin")
    change = scan_upper(upper)
    build_tests_layer(change, split(change, DEFAULT_TEST_PATHS).tests, upper, layer, OWNER, OWNER, 0o755)
    assert_same_sparse_file(layer / "tests" / "fixture.bin", source)
    assert not (layer / "calc.py").exists()


def test_the_session_carry_keeps_a_sparse_file_sparse_in_the_committed_home(tmp_path: Path):
    home_upper, committed = tmp_path / "home-upper", tmp_path / "committed"
    write(committed / ".keep", "")
    source = sparse(home_upper / ".cache" / "big.bin")
    carried = home.carry(home_upper, committed, [".cache/**"], OWNER, OWNER)
    assert carried == [".cache/big.bin"]
    assert_same_sparse_file(committed / ".cache" / "big.bin", source)
