"""The graded gate (policy ``evaluation = "tests"``) end to end: the real engine, the real sandbox image with
pytest and coverage.py, the real Claude Code CLI scripted on loopback, and fixture repositories with real
pytest suites that scripted agents change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from executor.store import Status
from tests.conftest import chown_tree, tree_digest, wait_status
from tests.scripted_api import ScriptedAPI, Turn

EXECUTOR = str(Path(sys.executable).parent / "executor")
PYTEST = 'python3 -m pytest -q -p no:cacheprovider --junitxml="$EXECUTOR_JUNIT_XML"'
SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.awaiting_review}

CALC = '''def add(a, b):
    return a + b


def sub(a, b):
    return a + b  # the bug: should subtract


def mul(a, b):
    return a * b


def div(a, b):
    if b == 0:
        raise ZeroDivisionError("b is zero")
    return a / b
'''
SUITE = '''import calc


def test_add():
    assert calc.add(2, 3) == 5


def test_mul():
    assert calc.mul(2, 3) == 6
'''
FIX = "sed -i 's/return a + b  # the bug: should subtract/return a - b/' calc.py"
FLAKY = '''import pathlib


def test_sometimes():
    # Fails on the first run on a fresh layer and passes on the next one (re-runs share the layer).
    counter = pathlib.Path(__file__).with_name(".runs")
    runs = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(runs + 1))
    assert runs % 2 == 1
'''
BOMB = '''import os


def pytest_unconfigure(config):
    # An entity-expansion ("billion laughs") report, written over pytest's own.
    entities = ['<!ENTITY l0 "lol">'] + [f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10)]
    with open(os.environ["EXECUTOR_JUNIT_XML"], "w") as fh:
        fh.write('<?xml version="1.0"?><!DOCTYPE r [' + "".join(entities) + ']><testsuites><testsuite>'
                 '<testcase classname="t" name="&l9;"/></testsuite></testsuites>')
'''
HUGE = '''import os


def pytest_unconfigure(config):
    # A 100 MB report, written over pytest's own.
    chunk = '<testcase classname="t" name="x"/>' * 30000
    with open(os.environ["EXECUTOR_JUNIT_XML"], "w") as fh:
        fh.write("<testsuites><testsuite>")
        for _ in range(100):
            fh.write(chunk)
        fh.write("</testsuite></testsuites>")
'''


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "edit"})


def write(path: str, content: str) -> Turn:
    return Turn.tool("Write", {"file_path": f"/workspace/{path}", "content": content})


def calc_repo(world, name: str) -> Path:
    return world.repo(name, {"calc.py": CALC, "tests/test_calc.py": SUITE})


def run_jobs(world, run_executor, jobs: dict[str, tuple[Path, list[Turn]]], **policy) -> dict:
    """Run jobs (id -> (repository, script)) under a graded policy; their settled rows by id."""
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST, **policy)
    with ScriptedAPI({key: script for key, (_, script) in jobs.items()}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        for key, (repo, _) in jobs.items():
            world.submit(id=key, workspace=str(repo), prompt=f"{key}: do it")
        store = runner.executor.store
        return {key: wait_status(store, key, SETTLED, timeout=240) for key in jobs}


def runs_of(world, job_id: str) -> list[dict]:
    return [e.data for e in world.store().events(job_id=job_id) if e.kind == "test_run"]


def cli(world, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXECUTOR, *args], env=world.env(), capture_output=True, text=True, timeout=120)


def test_a_bug_fix_whose_new_test_fails_before_and_passes_after_commits_and_show_names_it(world, run_executor):
    repo = calc_repo(world, "fix")
    test = "import calc\n\n\ndef test_sub():\n    assert calc.sub(5, 3) == 2\n"
    jobs = run_jobs(world, run_executor, {"fix-1": (repo, [bash(FIX), write("tests/test_sub.py", test),
                                                           Turn.text("Fixed sub and tested it.")])})
    job = jobs["fix-1"]
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert "return a - b" in (repo / "calc.py").read_text()
    ev = job.evaluation
    assert ev["kind"] == "tests_and_code" and ev["verdict"] == "passed" and ev["proved"] is True
    assert ev["fail_to_pass"] == ["tests.test_sub::test_sub"]
    assert ev["broken"] == [] and ev["flaky"] == []
    assert ev["pass_to_pass"] == 2  # test_add and test_mul passed before and after
    assert [r["run"] for r in ev["runs"]] == ["after", "before", "tests-only"]
    tests_only = [r for r in runs_of(world, "fix-1") if r["run"] == "tests-only"][0]
    assert tests_only["exit_code"] == 1 and tests_only["tests_reported"] == 3  # the new test failed there
    shown = cli(world, "show", "fix-1")
    assert shown.returncode == 0, shown.stderr
    assert "fail-to-pass" in shown.stdout and "tests.test_sub::test_sub" in shown.stdout
    as_json = json.loads(cli(world, "show", "fix-1", "--json").stdout)
    assert as_json["evaluation"]["fail_to_pass"] == ["tests.test_sub::test_sub"]
    assert not (world.home / "jobs" / "fix-1").exists()  # views, layer and run dirs went with the job
    report = json.loads(cli(world, "report", "--json").stdout)["evaluation"]
    assert report["graded"] == 1 and report["test_writing"] == 1 and report["proof_rate"] == 1.0


def test_tests_that_assert_nothing_or_already_pass_are_weak(world, run_executor):
    vacuous_repo, passing_repo = calc_repo(world, "vacuous"), calc_repo(world, "passing")
    before = tree_digest(vacuous_repo)
    world.write_policy("weakreview", evaluation="tests", review="never", test_command=PYTEST,
                       on_weak_tests="review")
    vacuous = "def test_sub():\n    assert True\n"
    passing = "import calc\n\n\ndef test_add_again():\n    assert calc.add(2, 2) == 4\n"
    jobs = {"weak-vacuous": (vacuous_repo, [bash(FIX), write("tests/test_sub.py", vacuous), Turn.text("Done.")]),
            "weak-passing": (passing_repo, [bash(FIX), write("tests/test_more.py", passing), Turn.text("Done.")])}
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST)
    with ScriptedAPI({key: script for key, (_, script) in jobs.items()}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        world.submit(id="weak-vacuous", workspace=str(vacuous_repo), prompt="weak-vacuous: do it")
        world.submit(id="weak-passing", workspace=str(passing_repo), prompt="weak-passing: do it",
                     policy="weakreview")
        store = runner.executor.store
        vac, pas = (wait_status(store, key, SETTLED, timeout=240) for key in jobs)
    assert vac.status == Status.rolled_back and vac.reason == "weak_tests", (vac.reason, vac.error)
    assert vac.evaluation["weak"] == ["tests.test_sub::test_sub"] and vac.evaluation["fail_to_pass"] == []
    assert "tests.test_sub::test_sub" in vac.error
    assert tree_digest(vacuous_repo) == before
    # on_weak_tests = "review": the same verdict waits for a person instead
    assert pas.status == Status.awaiting_review, (pas.reason, pas.error)
    assert pas.evaluation["verdict"] == "weak_tests"
    assert pas.evaluation["weak"] == ["tests.test_more::test_add_again"]
    assert [r["trigger"] for r in pas.review_reasons] == ["weak_tests"]
    shown = cli(world, "review", "show", "weak-passing")
    assert shown.returncode == 0, shown.stderr
    assert "weak tests (weak_tests)" in shown.stdout and "    tests.test_more::test_add_again" in shown.stdout


def test_a_change_that_breaks_or_deletes_an_existing_test_is_rolled_back_naming_it(world, run_executor):
    broken_repo, deleted_repo = calc_repo(world, "breaks"), calc_repo(world, "deletes")
    before = tree_digest(deleted_repo)
    only_add = "import calc\n\n\ndef test_add():\n    assert calc.add(2, 3) == 5\n"
    jobs = run_jobs(world, run_executor, {
        "breaks": (broken_repo, [bash("sed -i 's/return a \\* b/return a * b + 1/' calc.py"), Turn.text("Done.")]),
        "deletes": (deleted_repo, [bash("sed -i 's/return a \\* b/return a * b + 1/' calc.py"),
                                   bash("cat > tests/test_calc.py <<'EOF'\n" + only_add + "EOF"),
                                   Turn.text("Done.")]),
    })
    for key in ("breaks", "deletes"):
        job = jobs[key]
        assert job.status == Status.rolled_back and job.reason == "regression", (key, job.reason, job.error)
        assert job.evaluation["broken"] == ["tests.test_calc::test_mul"], job.evaluation
        assert "tests.test_calc::test_mul" in job.error
    assert "return a * b\n" in (broken_repo / "calc.py").read_text()
    assert tree_digest(deleted_repo) == before


def test_a_test_only_job_must_raise_coverage(world, run_executor):
    meaningful_repo, vacuous_repo = calc_repo(world, "harden"), calc_repo(world, "vacuous-harden")
    meaningful = ("import pytest\n\nimport calc\n\n\ndef test_div():\n    assert calc.div(6, 3) == 2\n"
                  "    with pytest.raises(ZeroDivisionError):\n        calc.div(1, 0)\n")
    jobs = run_jobs(world, run_executor, {
        "harden-good": (meaningful_repo, [write("tests/test_div.py", meaningful), Turn.text("Done.")]),
        "harden-vacuous": (vacuous_repo, [write("tests/test_nothing.py", "def test_nothing():\n    assert True\n"),
                                          Turn.text("Done.")]),
    })
    good, bad = jobs["harden-good"], jobs["harden-vacuous"]
    assert good.status == Status.succeeded, (good.reason, good.error)
    assert good.evaluation["kind"] == "tests" and good.evaluation["proved"] is True
    assert good.evaluation["coverage"]["files"] == {"calc.py": [14, 15, 16]}  # div's body, both branches
    assert good.evaluation["coverage"]["branches"] >= 2
    assert (meaningful_repo / "tests" / "test_div.py").read_text() == meaningful
    assert bad.status == Status.rolled_back and bad.reason == "no_coverage_gain", (bad.reason, bad.error)
    assert bad.evaluation["coverage"]["lines"] == 0 and bad.evaluation["proved"] is False
    assert not (vacuous_repo / "tests" / "test_nothing.py").exists()


def test_a_flaky_test_is_reported_and_counts_for_nothing(world, run_executor):
    repo = calc_repo(world, "flaky")
    test = "import calc\n\n\ndef test_sub():\n    assert calc.sub(5, 3) == 2\n"
    jobs = run_jobs(world, run_executor, {"flaky": (repo, [
        bash(FIX), write("tests/test_sub.py", test), write("tests/test_flaky.py", FLAKY), Turn.text("Done.")])})
    job = jobs["flaky"]
    # Without the re-run, its failure after the change would have rolled the job back (the job's own test
    # failing); counted, it would have passed for proof (it failed on tests-only and passed on the re-run).
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert job.evaluation["flaky"] == ["tests.test_flaky::test_sometimes"]
    assert job.evaluation["fail_to_pass"] == ["tests.test_sub::test_sub"]
    assert "tests.test_flaky::test_sometimes" not in job.evaluation["job_tests"]
    assert [r["run"] for r in job.evaluation["runs"]] == ["after", "after-rerun-1", "before", "tests-only"]
    shown = cli(world, "show", "flaky").stdout
    assert "flaky" in shown and "tests.test_flaky::test_sometimes" in shown


def test_a_hostile_report_is_refused_cleanly_and_the_executor_is_unharmed(world, run_executor):
    bomb_repo, huge_repo, after_repo = calc_repo(world, "bomb"), calc_repo(world, "huge"), calc_repo(world, "next")
    rss_before = psutil.Process().memory_info().rss
    test = "import calc\n\n\ndef test_sub():\n    assert calc.sub(5, 3) == 2\n"
    jobs = run_jobs(world, run_executor, {
        "bomb": (bomb_repo, [bash(FIX), write("tests/conftest.py", BOMB), Turn.text("Done.")]),
        "huge": (huge_repo, [bash(FIX), write("tests/conftest.py", HUGE), Turn.text("Done.")]),
        "next": (after_repo, [bash(FIX), write("tests/test_sub.py", test), Turn.text("Done.")]),
    })
    bomb, huge = jobs["bomb"], jobs["huge"]
    assert bomb.status == Status.failed and bomb.reason == "evaluation_error", (bomb.reason, bomb.error)
    assert "DTDForbidden" in bomb.error and "after" in bomb.error
    assert huge.status == Status.failed and huge.reason == "evaluation_error", (huge.reason, huge.error)
    assert "more than the 32.0 MiB" in huge.error
    refused = [r for r in runs_of(world, "huge") if r["problem"]]
    assert [r["run"] for r in refused] == ["after"] and "32.0 MiB" in refused[0]["problem"]
    for repo in (bomb_repo, huge_repo):
        assert "a + b  # the bug" in (repo / "calc.py").read_text()
    # the executor went on: the next job was graded and committed, and its memory did not balloon
    assert jobs["next"].status == Status.succeeded, (jobs["next"].reason, jobs["next"].error)
    assert psutil.Process().memory_info().rss - rss_before < 150 * 2**20


def test_before_runs_are_cached_per_state_of_the_tree(world, run_executor):
    # The person commits as root here and gives the tree back; a root of its own keeps this repository
    # apart from pytest's private temp dirs.
    root = Path(tempfile.mkdtemp(prefix="executor-evaluation-", dir="/tmp"))
    try:
        root.chmod(0o711)
        _cached(world, run_executor, root)
    finally:
        shutil.rmtree(root)


def _cached(world, run_executor, root: Path) -> None:
    repo = root / "cached"
    for rel, content in {"calc.py": CALC, "tests/test_calc.py": SUITE}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(content)

    def commit(message: str) -> None:  # as the person would (as root here; the tree is then given back)
        for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q",
                                     "-m", message]):
            subprocess.run(["git", "-c", "safe.directory=*", "-C", str(repo), *args], check=True, capture_output=True)
        chown_tree(repo)
        world.repo_made = time.time()

    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    commit("start")
    vacuous = "def test_sub():\n    assert True\n"
    script = [bash(FIX), write("tests/test_sub.py", vacuous), Turn.text("Done.")]  # weak: rolled back
    keys = ("cache-1", "cache-2", "cache-3", "cache-4", "cache-5")
    harden = [write("tests/test_div.py", "import calc\n\n\ndef test_div():\n    assert calc.div(6, 3) == 2\n"),
              Turn.text("Done.")]
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST)
    with ScriptedAPI({**{key: script for key in keys[:4]}, "cache-5": harden}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings(workspace_roots=[root]))
        store = runner.executor.store

        def run(key: str, reason: str = "weak_tests") -> None:
            world.submit(id=key, workspace=str(repo), prompt=f"{key}: do it")
            job = wait_status(store, key, SETTLED, timeout=240)
            assert job.reason == reason, (job.reason, job.error)

        run("cache-1")  # runs before and stores it
        run("cache-2")  # the same clean state: from the cache
        (repo / "notes.txt").write_text("not committed\n")
        chown_tree(repo)
        run("cache-3")  # an untracked file: a new state (git or not, clean or not), a new run
        commit("more")
        run("cache-4")  # the tree given back to its owner: every change time moved, a new state
        run("cache-5", "committed")  # a test-only job needs coverage, which the cached run did not measure
    cached = {key: [r["cached"] for r in runs_of(world, key) if r["run"] == "before"] for key in keys}
    notes = [world.store().get(key).evaluation["before_cache"] for key in keys]
    assert cached == {"cache-1": [False], "cache-2": [True], "cache-3": [False], "cache-4": [False],
                      "cache-5": [False]}, notes
    assert notes == ["stored", "hit", "stored", "stored", "stored"]
    assert len(list((world.home / "evaluation" / "before").glob("*.json"))) == 3


def test_no_report_and_a_gate_over_its_time_fail_the_job(world, run_executor):
    quiet_repo, slow_repo = calc_repo(world, "quiet"), calc_repo(world, "slow")
    world.write_policy("slow", evaluation="tests", review="never", test_command=f"sleep 30; {PYTEST}",
                       evaluation_timeout="4s")
    world.write_policy(evaluation="tests", review="never", test_command=PYTEST)
    change = [bash(FIX), Turn.text("Done.")]
    with ScriptedAPI({"quiet": change, "slow": change}) as api:
        world.write_runners(api.base_url)
        runner = run_executor(world.settings())
        world.submit(id="quiet", workspace=str(quiet_repo), prompt="quiet: do it", test_command="python3 -m pytest -q")
        world.submit(id="slow", workspace=str(slow_repo), prompt="slow: do it", policy="slow")
        store = runner.executor.store
        quiet, slow = (wait_status(store, key, SETTLED, timeout=240) for key in ("quiet", "slow"))
    assert quiet.status == Status.failed and quiet.reason == "evaluation_error", (quiet.reason, quiet.error)
    assert "wrote no JUnit XML report to $EXECUTOR_JUNIT_XML (exit 0)" in quiet.error
    assert quiet.evaluation["verdict"] == "evaluation_error" and quiet.test_exit_code == 0
    assert slow.status == Status.failed and slow.reason == "evaluation_timeout", (slow.reason, slow.error)
    assert [(r["run"], r["timed_out"]) for r in slow.evaluation["runs"]] == [("after", True)]
    assert "evaluation_timeout (4s)" in slow.evaluation["runs"][0]["problem"]
    for repo in (quiet_repo, slow_repo):
        assert "a + b  # the bug" in (repo / "calc.py").read_text()
