"""The graded gate's pure parts and its host-side file work: JUnit reports as untrusted input, the rules,
the tests-only layer (checked against a real overlay mount), coverage data, the before cache and the
policy keys. The runs themselves are proven on the real engine in tests/integration/test_evaluation.py."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from executor.errors import EvaluationError, NoCoverageGain, Regression, TestsFailed, WeakTests
from executor.evaluation import cache as cache_mod
from executor.evaluation import coverage as cov
from executor.evaluation.cache import BeforeCache, tree_state
from executor.evaluation.junit import MAX_REPORT, Report, parse, read_report
from executor.evaluation.layers import build_tests_layer, split
from executor.evaluation.rules import Runs, grade
from executor.policy import DEFAULT_TEST_PATHS, Policy
from executor.transaction.conflicts import CLOCK_SLACK_NS
from executor.transaction.safefs import DIR_FLAGS
from executor.transaction.upper import Change, Entry, scan_upper
from tests.unit.upper_tree import OWNER, opaque, require_root, require_user_xattrs, whiteout, write

PATHS = DEFAULT_TEST_PATHS


# --------------------------------------------------------------------------------------------- reports


def xml(*cases: str) -> io.BytesIO:
    return io.BytesIO(("<testsuites><testsuite name='s'>" + "".join(cases) + "</testsuite></testsuites>").encode())


def test_a_report_gives_each_test_its_outcome_and_a_test_named_twice_its_worst():
    report = parse(xml('<testcase classname="tests.test_a" name="ok"/>',
                       '<testcase classname="tests.test_a" name="bad"><failure message="x">trace</failure></testcase>',
                       '<testcase classname="tests.test_a" name="boom"><error/></testcase>',
                       '<testcase classname="tests.test_a" name="later"><skipped/></testcase>',
                       '<testcase classname="tests.test_a" name="twice"/>',
                       '<testcase classname="tests.test_a" name="twice"><failure/></testcase>',
                       '<testcase name="tests.test_b" file="tests/test_b.py"><error message="collection"/></testcase>'))
    assert report.outcomes == {"tests.test_a::ok": "passed", "tests.test_a::bad": "failed",
                               "tests.test_a::boom": "error", "tests.test_a::later": "skipped",
                               "tests.test_a::twice": "failed", "tests.test_b": "error"}
    assert report.files == {"tests.test_b": "tests/test_b.py"}
    assert parse(io.BytesIO(b"<testsuites/>")).outcomes == {}


@pytest.mark.parametrize("body, why", [
    (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><r>&b;</r>', "DTDForbidden"),
    (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>', "DTDForbidden"),
    (b"<testsuites><testsuite>", "no element found"),
    (b"", "no element found"),
    (b"not xml at all", "syntax error"),
    (b"<a>" * 40 + b"</a>" * 40, "deeper than 32"),
])
def test_a_hostile_or_broken_report_is_refused(body: bytes, why: str):
    with pytest.raises(EvaluationError, match=why):
        parse(io.BytesIO(body))


def test_a_report_is_read_from_its_directory_without_following_a_link_or_reading_too_much(tmp_path: Path):
    (tmp_path / "ok.xml").write_bytes(xml('<testcase classname="c" name="t"/>').getvalue())
    (tmp_path / "secret.xml").write_bytes(xml('<testcase classname="secret" name="t"/>').getvalue())
    os.symlink(tmp_path / "secret.xml", tmp_path / "link.xml")
    os.mkfifo(tmp_path / "fifo.xml")
    with open(tmp_path / "huge.xml", "wb") as fh:  # sparse: refused by its size before a byte is read
        fh.truncate(100 * 2**20)
    fd = os.open(tmp_path, DIR_FLAGS)
    try:
        assert read_report(fd, "ok.xml").outcomes == {"c::t": "passed"}
        assert read_report(fd, "missing.xml") is None
        with pytest.raises(EvaluationError, match="a symlink"):
            read_report(fd, "link.xml")
        with pytest.raises(EvaluationError, match="not a regular file"):
            read_report(fd, "fifo.xml")
        with pytest.raises(EvaluationError, match="100.0 MiB, more than the 32.0 MiB"):
            read_report(fd, "huge.xml")
    finally:
        os.close(fd)
    assert MAX_REPORT == 32 * 2**20


# ------------------------------------------------------------------------------------------------ rules


def change(*entries: tuple[str, str]) -> Change:
    return Change([Entry(path, kind) for path, kind in entries])


FIX = change(("calc.py", "file"), ("tests", "dir"), ("tests/test_new.py", "file"))
CODE = change(("calc.py", "file"))
HARDEN = change(("tests", "dir"), ("tests/test_new.py", "file"))
OLD = Report({"tests.test_calc::test_add": "passed", "tests.test_calc::test_mul": "passed"})
NEW = "tests.test_new::test_sub"


def after(*extra: tuple[str, str], **changed: str) -> Report:
    outcomes = {**OLD.outcomes, **dict(extra)}
    outcomes.update({f"tests.test_calc::{k}": v for k, v in changed.items()})
    return Report(outcomes)


def test_a_new_test_that_fails_without_the_code_change_and_passes_with_it_is_proof():
    runs = Runs(after=[after((NEW, "passed"))], before=OLD, tests_only_ran=True,
                tests_only=after((NEW, "failed")))
    verdict = grade(split(FIX, PATHS), runs, PATHS)
    assert verdict.error is None and verdict.proved is True
    assert verdict.fail_to_pass == [NEW] and verdict.pass_to_pass == 2
    # not even collected on the old code (an import error) counts as failing there, and so does a run that
    # wrote no report at all
    for tests_only in (Report({**OLD.outcomes, "tests.test_new": "error"}), None):
        runs.tests_only = tests_only
        assert grade(split(FIX, PATHS), runs, PATHS).fail_to_pass == [NEW]


def test_tests_that_already_pass_without_the_change_are_weak():
    runs = Runs(after=[after((NEW, "passed"))], before=OLD, tests_only_ran=True, tests_only=after((NEW, "passed")))
    verdict = grade(split(FIX, PATHS), runs, PATHS)
    assert isinstance(verdict.error, WeakTests) and verdict.error.reason == "weak_tests"
    assert verdict.weak == [NEW] and verdict.error.context["tests"] == [NEW] and NEW in str(verdict.error)
    assert verdict.record()["verdict"] == "weak_tests" and verdict.proved is False


def test_a_test_that_passed_before_and_fails_is_skipped_or_is_gone_after_is_a_regression():
    for broken in (after(test_mul="failed"), after(test_mul="error"), after(test_mul="skipped"),
                   Report({"tests.test_calc::test_add": "passed"})):
        verdict = grade(split(CODE, PATHS), Runs(after=[broken], before=OLD), PATHS)
        assert isinstance(verdict.error, Regression), broken
        assert verdict.broken == ["tests.test_calc::test_mul"] and "test_mul" in str(verdict.error)
    # a test that failed before and still fails is not the job's doing; nothing passed before a suite that
    # wrote no report
    old_failing = Report({**OLD.outcomes, "tests.test_calc::test_mul": "failed"})
    assert grade(split(CODE, PATHS), Runs(after=[after(test_mul="failed")], before=old_failing), PATHS).error is None
    assert grade(split(CODE, PATHS), Runs(after=[after(test_mul="failed")], before=None), PATHS).error is None


def test_a_flaky_test_counts_for_nothing():
    flips = [after(test_mul="failed"), after(test_mul="passed")]
    verdict = grade(split(CODE, PATHS), Runs(after=flips, before=OLD), PATHS)
    assert verdict.error is None and verdict.flaky == ["tests.test_calc::test_mul"] and verdict.broken == []
    # a job whose only "proof" is a flaky test proved nothing
    runs = Runs(after=[after((NEW, "failed")), after((NEW, "passed"))], before=OLD, tests_only_ran=True,
                tests_only=after((NEW, "failed")))
    verdict = grade(split(FIX, PATHS), runs, PATHS)
    assert verdict.flaky == [NEW] and verdict.fail_to_pass == [] and verdict.job_tests == []
    assert verdict.error is None and verdict.proved is None  # no test of its own is left to prove anything


def test_the_jobs_own_tests_must_pass_with_its_change():
    runs = Runs(after=[after((NEW, "failed"))], before=OLD, tests_only_ran=True, tests_only=after((NEW, "failed")))
    verdict = grade(split(FIX, PATHS), runs, PATHS)
    assert type(verdict.error) is TestsFailed and verdict.failing == [NEW]


def test_the_tests_of_a_changed_test_file_are_the_jobs_even_when_their_ids_are_old():
    edited = change(("calc.py", "file"), ("tests", "dir"), ("tests/test_calc.py", "file"))
    runs = Runs(after=[after(test_mul="passed")], before=OLD, tests_only_ran=True,
                tests_only=after(test_mul="failed"))
    verdict = grade(split(edited, PATHS), runs, PATHS)
    assert verdict.job_tests == ["tests.test_calc::test_add", "tests.test_calc::test_mul"]
    assert verdict.fail_to_pass == ["tests.test_calc::test_mul"] and verdict.error is None
    by_file = Report({"Suite adds": "passed"}, {"Suite adds": "/workspace/src/add.test.js"})
    js = change(("src", "dir"), ("src/add.js", "file"), ("src/add.test.js", "file"))
    runs = Runs(after=[by_file], before=Report({"Suite adds": "passed"}), tests_only_ran=True,
                tests_only=Report({"Suite adds": "failed"}))
    assert grade(split(js, PATHS), runs, PATHS).fail_to_pass == ["Suite adds"]


def coverage(**files: list[int]) -> cov.Coverage:
    return cov.Coverage({f.replace("_DOT_", "."): frozenset(v) for f, v in files.items()},
                        {f.replace("_DOT_", "."): frozenset() for f in files})


def test_a_test_only_job_must_cover_code_the_suite_did_not():
    runs = Runs(after=[after((NEW, "passed"))], before=OLD,
                coverage_before=coverage(calc_DOT_py=[1, 2, 5]), coverage_after=coverage(calc_DOT_py=[1, 2, 5, 9, 10]))
    verdict = grade(split(HARDEN, PATHS), runs, PATHS)
    assert verdict.kind == "tests" and verdict.error is None and verdict.proved is True
    assert verdict.coverage["files"] == {"calc.py": [9, 10]} and verdict.coverage["lines"] == 2
    # lines of test files never count; the same code lines are no gain
    runs.coverage_after = cov.Coverage({"calc.py": frozenset({1, 2, 5}), "tests/test_new.py": frozenset({1, 2})}, {})
    verdict = grade(split(HARDEN, PATHS), runs, PATHS)
    assert isinstance(verdict.error, NoCoverageGain) and verdict.error.reason == "no_coverage_gain"
    assert isinstance(verdict.error, WeakTests)  # on_weak_tests applies to it too
    runs.coverage_before = None
    assert type(grade(split(HARDEN, PATHS), runs, PATHS).error) is EvaluationError


def test_a_newly_taken_branch_is_a_gain():
    before = cov.Coverage({"calc.py": frozenset({1, 2, 3})}, {"calc.py": frozenset({(2, 3)})})
    after_ = cov.Coverage({"calc.py": frozenset({1, 2, 3})}, {"calc.py": frozenset({(2, 3), (2, -1)})})
    gained = cov.gain(before, after_, PATHS)
    assert gained.any and gained.branches == 1 and gained.lines == {}


# ------------------------------------------------------------------------------------------- coverage data


def test_coverage_data_is_read_as_untrusted_input(tmp_path: Path):
    good = {"files": {"calc.py": {"executed_lines": [1, 2], "executed_branches": [[1, 2]]},
                      "/workspace/pkg/m.py": {"executed_lines": [3]},
                      "../outside.py": {"executed_lines": [1]}, "/usr/lib/x.py": {"executed_lines": [1]}}}
    (tmp_path / "coverage.json").write_text(json.dumps(good))
    fd = os.open(tmp_path, DIR_FLAGS)
    try:
        data = cov.read(fd)
        assert data.lines == {"calc.py": frozenset({1, 2}), "pkg/m.py": frozenset({3})}
        assert data.arcs["calc.py"] == frozenset({(1, 2)})
        for bad in ({"files": {"a.py": {"executed_lines": ["1"]}}}, {"files": []}, [1, 2], "x"):
            (tmp_path / "coverage.json").write_text(json.dumps(bad))
            with pytest.raises(EvaluationError, match="not what coverage.py writes"):
                cov.read(fd)
        os.unlink(tmp_path / "coverage.json")
        assert cov.read(fd) is None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ tests layer


def test_split_sorts_a_change_into_test_and_code_paths():
    assert split(FIX, PATHS).kind == "tests_and_code" and split(FIX, PATHS).test_files == ["tests/test_new.py"]
    assert split(CODE, PATHS).kind == "code" and split(HARDEN, PATHS).kind == "tests"
    assert split(change(("tests", "dir")), PATHS).kind == "none"
    for path in ("pkg/tests/x.py", "a/test_b.py", "b_test.py", "conftest.py", "web/x.test.js", "web/y.spec.ts",
                 "web/__tests__/z.js", "pkg/w_test.go", "pkg/testdata/in.txt"):
        assert split(change((path, "file")), PATHS).kind == "tests", path
    for path in ("calc.py", "testing.py", "src/contest.py", "web/x.js", "pkg/w.go"):
        assert split(change((path, "file")), PATHS).kind == "code", path


@pytest.fixture
def overlay_dirs(tmp_path: Path) -> Path:
    require_root()
    require_user_xattrs(tmp_path)
    return tmp_path


def test_the_tests_only_layer_over_the_repository_shows_the_old_code_with_the_new_tests(overlay_dirs: Path):
    base = overlay_dirs
    repo, upper = base / "repo", base / "upper"
    write(repo / "calc.py", "old code\n")
    write(repo / "tests/test_calc.py", "old test\n")
    write(repo / "tests/test_gone.py", "deleted by the job\n")
    write(repo / "fixtures/tests/a.txt", "replaced by the job\n")
    write(repo / "fixtures/tests/b.txt", "replaced by the job\n")
    write(upper / "calc.py", "new code\n")  # code: not in the layer
    write(upper / "tests/test_calc.py", "new test\n", mode=0o000)  # even unreadable to its owner
    write(upper / "tests/test_new.py", "added test\n")
    whiteout(upper / "tests/test_gone.py")
    os.symlink("/etc/passwd", upper / "tests/link.txt")
    opaque(upper / "fixtures/tests")
    write(upper / "fixtures/tests/c.txt", "the new fixture\n")
    os.chmod(upper / "tests", 0o555)  # a read-only test dir still gets its files
    change_ = scan_upper(upper)
    parts = split(change_, PATHS)
    layer = base / "layer"
    passwd = Path("/etc/passwd").read_bytes()
    build_tests_layer(change_, parts.tests, upper, layer, OWNER, OWNER, 0o755)

    assert not (layer / "calc.py").exists()
    st = (layer / "tests/test_gone.py").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # a whiteout
    assert os.readlink(layer / "tests/link.txt") == "/etc/passwd" and Path("/etc/passwd").read_bytes() == passwd
    assert os.getxattr(layer / "fixtures/tests", "user.overlay.opaque") == b"y"
    assert os.listxattr(layer / "fixtures") == []  # a plain directory above it
    for path in (layer / "tests", layer / "tests/test_new.py", layer / "fixtures/tests/c.txt"):
        assert path.lstat().st_uid == OWNER, path
    assert stat.S_IMODE((layer / "tests").stat().st_mode) == 0o555

    merged, work = base / "merged", base / "work"
    merged.mkdir()
    work.mkdir()
    opts = f"lowerdir={layer}:{repo},upperdir={base / 'top'},workdir={work},userxattr,metacopy=off,index=off"
    (base / "top").mkdir()
    mount = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.fail(f"cannot mount overlayfs here (the executor needs it): {mount.stderr.strip()}")
    try:
        seen = {str(p.relative_to(merged)): p.read_text() for p in merged.rglob("*") if p.is_file()
                and not p.is_symlink()}
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert seen == {"calc.py": "old code\n", "tests/test_calc.py": "new test\n", "tests/test_new.py": "added test\n",
                    "fixtures/tests/c.txt": "the new fixture\n"}


# -------------------------------------------------------------------------------------------- the cache


def settled_tree(path: Path, files: dict[str, str]) -> Path:
    """A tree whose files were written more than the clock's slack ago (a state is named only then)."""
    for rel, content in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(content)
    time.sleep(CLOCK_SLACK_NS / 1e9 + 0.01)  # past the window in which two writes look alike
    return path


def state_of(path: Path) -> tuple[str | None, str]:
    fd = os.open(path, DIR_FLAGS)
    try:
        return tree_state(fd)
    finally:
        os.close(fd)


def test_a_trees_state_covers_tracked_untracked_and_ignored_files_but_not_git(tmp_path: Path):
    repo = settled_tree(tmp_path / "r", {"a.py": "a = 1\n", ".gitignore": "build/\n", "build/out.o": "x",
                                         "tests/test_a.py": "def test(): pass\n"})
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    first, why = state_of(repo)
    assert first is not None and why == ""
    assert state_of(repo)[0] == first  # nothing changed: the same state
    for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "s"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    time.sleep(CLOCK_SLACK_NS / 1e9 + 0.01)
    assert state_of(repo)[0] == first  # a commit changes .git only: the tree the tests see is the same

    states = {first}
    for change, touches in ((lambda: (repo / "notes.txt").write_text("untracked\n"), True),  # an untracked file
                            (lambda: (repo / "build/out.o").write_text("y"), True),  # an ignored one
                            (lambda: (repo / "a.py").write_text("a = 1\n"), True),  # the same bytes anew
                            (lambda: os.chmod(repo / "a.py", 0o755), True),  # a mode
                            (lambda: os.symlink("/etc", repo / "link"), True),  # a link (never followed)
                            (lambda: (repo / "notes.txt").unlink(), False)):  # a file gone
        change()
        if touches:  # an entry written within the clock's slack: two such writes could look alike
            assert state_of(repo) == (None, "the repository is changing right now")
            time.sleep(CLOCK_SLACK_NS / 1e9 + 0.01)
        found, _ = state_of(repo)
        assert found is not None and found not in states
        states.add(found)


def test_a_tree_that_is_not_a_git_repository_has_a_state_and_a_huge_one_none(tmp_path: Path, monkeypatch):
    plain = settled_tree(tmp_path / "plain", {f"d{i}/f{j}.txt": "x" for i in range(3) for j in range(4)})
    assert state_of(plain)[0] is not None
    monkeypatch.setattr(cache_mod, "MAX_ENTRIES", 10)  # the bound, made small enough to reach here
    assert state_of(plain) == (None, "the repository holds more than 10 entries")


def test_the_cache_keeps_a_before_run_per_state_command_and_image(tmp_path: Path):
    cache = BeforeCache(tmp_path / "before", "sha256:image")
    key = cache.key("tree1", "pytest")
    assert len({key, cache.key("tree2", "pytest"), cache.key("tree1", "pytest -x"),
                BeforeCache(tmp_path / "before", "sha256:other").key("tree1", "pytest")}) == 4
    assert cache.load(key) is None
    cache.store(key, Report({"t::a": "passed"}), coverage(calc_DOT_py=[1]))
    report, data = cache.load(key)
    assert report.outcomes == {"t::a": "passed"} and data.lines == {"calc.py": frozenset({1})}
    assert stat.S_IMODE((tmp_path / "before").stat().st_mode) == 0o700
    (tmp_path / "before" / f"{key}.json").write_text("{torn")
    assert cache.load(key) is None


# -------------------------------------------------------------------------------------------- the policy


def test_the_policy_keys_of_the_graded_gate():
    policy = Policy()
    assert policy.evaluation == "exit-code" and policy.flaky_reruns == 2 and policy.on_weak_tests == "rollback"
    assert "**/tests/**" in policy.test_paths and "*_test.go" in policy.test_paths
    assert Policy(evaluation="tests", evaluation_timeout="10m").evaluation_timeout == 600.0
    for bad in ({"evaluation": "strict"}, {"on_weak_tests": "ignore"}, {"flaky_reruns": -1}):
        with pytest.raises(ValidationError):
            Policy(**bad)
