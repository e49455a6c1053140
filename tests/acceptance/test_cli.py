"""The ``executor`` command as a person uses it: a subprocess with EXECUTOR_* in its environment.

The submit tests need no Docker. The serve tests run the real engine, the real sandbox image and the
real Claude Code CLI against a scripted Messages API on loopback (the policy uses network host).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from executor.store import Job, Status, Store
from tests.conftest import TOKEN_VALUE, tree_digest, wait_for
from tests.scripted_api import ScriptedAPI, Turn

ROOT = Path(__file__).resolve().parents[2]
EXECUTOR = ROOT / ".venv" / "bin" / "executor"
if not EXECUTOR.exists():  # pragma: no cover - another virtualenv layout
    EXECUTOR = Path(shutil.which("executor") or EXECUTOR)

TERMINAL = {"succeeded", "rolled_back", "failed", "cancelled", "stalled"}


def executor(world, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXECUTOR), *args], env=world.env(), input=input, capture_output=True,
                          timeout=timeout, cwd=world.root)


def job_file(path: Path, repo: Path, **fields) -> Path:
    body = {"runner": "scripted", "workspace": str(repo), "prompt": "write hello.txt"}
    body.update(fields)
    path.write_text(json.dumps(body))
    return path


def spool_files(world, sub: str = "incoming") -> list[Path]:
    d = world.home / "spool" / sub
    return sorted(d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------------------------------------
# submit, to a serving executor that takes jobs in but starts none (a disk reserve larger than the disk)


@pytest.fixture
def serving(world, run_executor):
    """An executor that serves the world's state root and holds every job in its queue."""
    running = run_executor(world.settings(disk_reserve=2**62))
    wait_for(lambda: (world.home / "status.json").exists(), 60, "the executor's first snapshot")
    return running.executor.store


def accepted(store, job_id: str):
    return wait_for(lambda: store.get(job_id), 30, f"job {job_id} taken in")


def test_submit_file_prints_id_and_spools_it(world, tmp_path, serving):
    repo = world.repo("app")
    path = job_file(tmp_path / "job.json", repo, priority=2, test_command="make test")
    done = executor(world, "submit", str(path))
    assert done.returncode == 0, done.stderr.decode()
    job_id = done.stdout.decode().strip()
    assert job_id and "\n" not in job_id
    job = accepted(serving, job_id)
    assert job.workspace == str(repo) and job.priority == 2 and job.test_command == "make test"
    assert job.runner == "scripted" and job.prompt == "write hello.txt" and job.status == Status.queued
    (spooled,) = spool_files(world, "accepted")
    assert json.loads(spooled.read_text())["id"] == job_id
    assert spool_files(world, "tmp") == []


def test_submit_keeps_the_files_own_id(world, tmp_path, serving):
    repo = world.repo("app")
    done = executor(world, "submit", str(job_file(tmp_path / "job.json", repo, id="my-job-7")))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "my-job-7"
    assert accepted(serving, "my-job-7").prompt == "write hello.txt"


def test_submit_two_files_gives_two_ids(world, tmp_path, serving):
    repo = world.repo("app")
    ids = {executor(world, "submit", str(job_file(tmp_path / f"j{i}.json", repo))).stdout.decode().strip()
           for i in range(2)}
    assert len(ids) == 2 and "" not in ids
    assert all(accepted(serving, job_id) for job_id in ids)


def test_submit_from_stdin(world, serving):
    repo = world.repo("app")
    body = json.dumps({"runner": "scripted", "workspace": str(repo), "prompt": "from stdin"}).encode()
    done = executor(world, "submit", "-", input=body)
    assert done.returncode == 0, done.stderr.decode()
    assert accepted(serving, done.stdout.decode().strip()).prompt == "from stdin"


def test_submit_refuses_without_a_serving_executor(world, tmp_path):
    """No executor serves the state root: a submitted file would wait for nobody; nothing is spooled, and
    no spool directory is created where the person happened to be."""
    repo = world.repo("app")
    done = executor(world, "submit", str(job_file(tmp_path / "job.json", repo)))
    assert done.returncode != 0 and "no executor serves the state root" in done.stderr.decode()
    assert not (world.home / "spool").exists()
    elsewhere = subprocess.run([str(EXECUTOR), "submit", str(tmp_path / "job.json")], capture_output=True,
                               cwd=tmp_path, env={k: v for k, v in world.env().items() if k != "EXECUTOR_HOME"})
    assert elsewhere.returncode != 0 and not (tmp_path / "store").exists()


def test_submit_judges_by_the_serving_executors_settings_not_its_own(world, tmp_path, serving):
    """The daemon's budget is 4 cpus (the world's default); a submitter whose environment says 1 would
    refuse a 2-cpu policy the daemon accepts, and one whose environment says 64 would accept what the
    daemon refuses."""
    world.write_policy("two", cpus=2.0)
    world.write_policy("huge", cpus=16.0)
    repo = world.repo("app")
    env_small = {**world.env(), "EXECUTOR_BUDGET_CPUS": "1"}
    ok = subprocess.run([str(EXECUTOR), "submit", str(job_file(tmp_path / "a.json", repo, policy="two"))],
                        env=env_small, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env_big = {**world.env(), "EXECUTOR_BUDGET_CPUS": "64"}
    refused = subprocess.run([str(EXECUTOR), "submit", str(job_file(tmp_path / "b.json", repo, policy="huge"))],
                             env=env_big, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "whole budget is 4" in refused.stderr


BAD_SUBMISSIONS = {
    "malformed": (lambda repo: b'{"runner": "scripted", ', "not valid JSON"),
    "not-object": (lambda repo: b'["a"]', "one JSON object"),
    "unknown-field": (lambda repo: json.dumps({"runner": "scripted", "workspace": str(repo), "prompt": "p",
                                               "modle": "x"}).encode(), "unknown field 'modle'"),
    "missing-field": (lambda repo: json.dumps({"runner": "scripted", "prompt": "p"}).encode(),
                      "missing required field 'workspace'"),
    "unknown-runner": (lambda repo: json.dumps({"runner": "ghost", "workspace": str(repo), "prompt": "p"}).encode(),
                       "unknown runner 'ghost'"),
    "outside-roots": (lambda repo: json.dumps({"runner": "scripted", "workspace": "/etc", "prompt": "p"}).encode(),
                      "not under a workspace root"),
    "bad-id": (lambda repo: json.dumps({"runner": "scripted", "workspace": str(repo), "prompt": "p",
                                        "id": "no spaces"}).encode(), "id"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBMISSIONS))
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_submit_bad_job_fails_clearly_and_spools_nothing(world, tmp_path, case, via, serving):
    repo = world.repo("app")
    make, expected = BAD_SUBMISSIONS[case]
    raw = make(repo)
    if via == "file":
        path = tmp_path / "bad.json"
        path.write_bytes(raw)
        done = executor(world, "submit", str(path))
    else:
        done = executor(world, "submit", "-", input=raw)
    assert done.returncode != 0
    stderr = done.stderr.decode()
    assert expected in stderr, stderr
    assert "Traceback" not in stderr
    assert done.stdout == b""
    for sub in ("incoming", "tmp", "accepted", "rejected"):
        assert spool_files(world, sub) == [], sub


def test_a_file_the_executor_rejects_is_a_job_record_under_its_id(world, serving):
    """A writer that bypassed `submit` (or a daemon whose policies changed meanwhile): the file the serving
    executor refuses is still a job the person can look up, with the reason."""
    from executor.intake.spool import Spool

    Spool(world.home / "spool").write(json.dumps({"id": "bad-1", "runner": "ghost", "workspace": "/nowhere",
                                                  "prompt": "p"}).encode())
    job = wait_for(lambda: serving.get("bad-1"), 30, "the rejected file's record")
    assert job.status == Status.rejected and "unknown runner 'ghost'" in job.error
    shown = json.loads(executor(world, "show", "bad-1", "--json").stdout)
    assert shown["status"] == "rejected" and shown["reason"] == "invalid_job"
    listed = executor(world, "jobs", "--status", "rejected").stdout.decode()
    assert "bad-1" in listed


def test_submit_missing_file(world, tmp_path, serving):
    done = executor(world, "submit", str(tmp_path / "nope.json"))
    assert done.returncode != 0
    assert "nope.json" in done.stderr.decode()
    assert spool_files(world) == []


def test_submit_of_an_existing_id_is_refused(world, tmp_path, serving):
    repo = world.repo("app")
    serving.add_job(Job(id="taken", session_id="taken", runner="scripted", model_requested="claude-sonnet-4-5",
                        workspace=str(repo), prompt="p", policy_name="default"))
    done = executor(world, "submit", str(job_file(tmp_path / "job.json", repo, id="taken")))
    assert done.returncode != 0
    assert "already exists" in done.stderr.decode()
    assert spool_files(world) == []


def test_a_runners_file_broken_while_serving_is_a_problem_in_status_logged_once(world, serving, caplog):
    before = executor(world, "status", "--json")
    assert json.loads(before.stdout)["problems"] == []
    runners = world.policies / "runners.toml"
    good = runners.read_text()
    runners.write_text(good + "\n[broken\n")
    wait_for(lambda: json.loads(executor(world, "status", "--json").stdout)["problems"], 30,
             "the broken runners file shown by status")
    shown = executor(world, "status")
    assert "executor   running with problems" in shown.stdout.decode()
    assert "runners.toml" in shown.stdout.decode() and "previous runners stay in use" in shown.stdout.decode()
    ticks = json.loads((world.home / "status.json").read_text())["ts"]
    wait_for(lambda: json.loads((world.home / "status.json").read_text())["ts"] > ticks + 2, 30, "more ticks")
    logged = [r for r in caplog.records if "runners.toml unreadable" in r.getMessage()]
    assert len(logged) == 1, f"logged {len(logged)} times; once per change is enough"
    runners.write_text(good)  # fixed: the problem goes away
    wait_for(lambda: json.loads(executor(world, "status", "--json").stdout)["problems"] == [], 30,
             "the problem cleared")


def test_show_says_why_a_queued_job_waits_and_retry_runs_a_cancelled_one_again(world, tmp_path, serving):
    repo = world.repo("app")
    job_id = executor(world, "submit", str(job_file(tmp_path / "job.json", repo, session_id="sess-1"))).stdout.decode().strip()
    accepted(serving, job_id)
    waiting = wait_for(lambda: json.loads(executor(world, "show", job_id, "--json").stdout)["waiting"], 30,
                       "the serving loop to say why the job waits")
    assert "EXECUTOR_DISK_RESERVE" in waiting  # this executor's reserve is larger than any disk
    assert f"waiting          {waiting}" in executor(world, "show", job_id).stdout.decode()

    early = executor(world, "retry", job_id)
    assert early.returncode == 1 and "only a failed, rolled back, stalled or cancelled job" in early.stderr.decode()
    assert executor(world, "cancel", job_id).returncode == 0
    again = executor(world, "retry", job_id, "--json")
    assert again.returncode == 0, again.stderr.decode()
    new_id = json.loads(again.stdout)["id"]
    made = accepted(serving, new_id)
    assert made.follows == job_id and made.session_id == "sess-1" and made.prompt == "write hello.txt"
    assert made.status == Status.queued and new_id != job_id
    assert json.loads(executor(world, "show", job_id, "--json").stdout)["followed_by"] == [new_id]
    assert json.loads(executor(world, "show", new_id, "--json").stdout)["follows"] == job_id


def test_show_of_an_unknown_job(world):
    world.store().close()  # an empty database
    done = executor(world, "show", "ghost", "--json")
    assert done.returncode != 0
    assert "no job 'ghost'" in done.stderr.decode()


# ---------------------------------------------------------------------------------------------
# serve (Docker)


class Serve:
    """``executor serve`` as a subprocess, its stderr in a file."""

    def __init__(self, world, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = world.env()
        env.update(extra_env or {})
        self.proc = subprocess.Popen([str(EXECUTOR), "serve"], env=env, stdout=self._log, stderr=self._log,
                                     cwd=world.root)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (fails if it does not exit within ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"executor serve did not exit within {timeout}s of SIGTERM:\n{self.stderr()[-3000:]}")
        self.stop_seconds = time.monotonic() - started
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"executor serve exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")


@pytest.fixture
def serve(world, tmp_path, docker_client):
    started: list[Serve] = []

    def start(name: str = "serve", extra_env: dict[str, str] | None = None) -> Serve:
        s = Serve(world, tmp_path / f"{name}.log", extra_env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def show(world, job_id: str) -> dict:
    done = executor(world, "show", job_id, "--json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def wait_cli_status(world, server: Serve, job_id: str, wanted: set[str], timeout: float = 180) -> dict:
    """Poll ``executor show ID --json`` until the job reaches one of ``wanted`` (or a terminal status)."""
    deadline = time.monotonic() + timeout
    view: dict = {}
    while time.monotonic() < deadline:
        server.assert_alive()
        done = executor(world, "show", job_id, "--json")
        if done.returncode == 0:
            view = json.loads(done.stdout)
            if view["status"] in wanted or view["status"] in TERMINAL:
                return view
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach {sorted(wanted)} in {timeout}s (last: {view.get('status')}); "
                f"serve log:\n{server.stderr()[-3000:]}")


def leftovers(client, job_id: str) -> list[str]:
    """Containers and volumes of this job (other test sessions may share the engine)."""
    filters = {"label": ["io.executor=1", f"io.executor.job={job_id}"]}
    return ([c.name for c in client.containers.list(all=True, filters=filters)]
            + [v.name for v in client.volumes.list(filters=filters)])


def submit(world, path: Path) -> str:
    # `submit` judges by the serving executor's settings: the executor must have written its first snapshot.
    wait_for(lambda: (world.home / "status.json").exists(), 60, "the serving executor's first snapshot")
    done = executor(world, "submit", str(path))
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def test_show_says_how_an_attempt_that_could_not_start_ended(world, tmp_path, serve):
    """An attempt that ends before its agent runs (here the engine refuses the container: more CPUs than the
    machine has) is shown failed with why, never ``running``."""
    world.write_policy("huge", cpus=1000)
    repo = world.repo("huge")
    server = serve(extra_env={"EXECUTOR_BUDGET_CPUS": "2000"})  # the budget admits it; the engine does not
    job_id = submit(world, job_file(tmp_path / "job.json", repo, policy="huge"))
    view = wait_cli_status(world, server, job_id, TERMINAL, timeout=120)
    assert (view["status"], view["reason"]) == ("failed", "sandbox"), view["error"]
    [attempt] = view["attempts"]
    assert (attempt["status"], attempt["reason"], attempt["outcome"]) == ("failed", "sandbox", None)
    assert attempt["finished_at"] is not None
    lines = executor(world, "show", job_id).stdout.decode().splitlines()
    [line] = [line for line in lines if line.strip().startswith("1 on ")]
    assert "failed (sandbox)" in line and "running" not in line, line


def test_serve_says_at_start_that_its_postgresql_store_starts_an_empty_history(world, serve, pg_empty_url):
    store = world.store()  # the history this host had while its store was the SQLite file
    store.add_job(Job(id="before-the-switch", session_id="s", runner="scripted", model_requested="m", workspace="/w",
                      prompt="p", policy_name="default"))
    store.close()
    server = serve(extra_env={"EXECUTOR_DATABASE_URL": pg_empty_url})
    wait_for(lambda: "starts an empty history" in server.stderr(), 60, "the start-up note")
    [line] = [line for line in server.stderr().splitlines() if "starts an empty history" in line]
    assert "warning" in line and "jobs=1" in line and "executor db copy" in line
    assert str(world.home / "executor.db") in line
    assert server.stop() == 0


def test_serve_runs_a_submitted_job_to_success(world, tmp_path, serve, docker_client):
    repo = world.repo("app", {"README.md": "app\n"})
    script = {
        "cli-full-path": [
            Turn.tool("Write", {"file_path": "/workspace/hello.txt", "content": "hello from the agent\n"}),
            Turn.text("Wrote hello.txt."),
        ]
    }
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="grep -q 'hello from the agent' hello.txt && echo TESTS-OK")
        server = serve()
        job_id = submit(world, job_file(tmp_path / "job.json", repo, prompt="cli-full-path: write hello.txt"))
        view = wait_cli_status(world, server, job_id, {"succeeded"})
        assert view["status"] == "succeeded", (view["reason"], view["error"], server.stderr()[-3000:])
        assert api.remaining("cli-full-path") == 0  # the agent really went through the script

        for key in ("id", "session_id", "status", "runner", "model_requested", "models_seen", "attempts",
                    "error", "changed_files", "tests"):
            assert key in view, key
        assert view["id"] == job_id and view["session_id"] == job_id
        assert view["runner"] == "scripted" and view["model_requested"] == "claude-sonnet-4-5"
        assert view["models_seen"] == ["claude-sonnet-4-5"]
        assert view["error"] is None
        assert len(view["attempts"]) == 1 and view["attempts"][0]["number"] == 1
        assert "hello.txt" in view["changed_files"]
        tests = view["tests"]
        assert set(tests) >= {"command", "exit_code", "output_tail"}
        assert tests["command"] == "grep -q 'hello from the agent' hello.txt && echo TESTS-OK"
        assert tests["exit_code"] == 0
        assert "TESTS-OK" in tests["output_tail"]

        listed = executor(world, "jobs", "--json")
        assert listed.returncode == 0, listed.stderr.decode()
        rows = json.loads(listed.stdout)
        assert [(r["id"], r["status"], r["runner"]) for r in rows] == [(job_id, "succeeded", "scripted")]
        only_ok = json.loads(executor(world, "jobs", "--json", "--status", "succeeded").stdout)
        assert [r["id"] for r in only_ok] == [job_id]
        assert json.loads(executor(world, "jobs", "--json", "--status", "queued").stdout) == []

        log = executor(world, "log", job_id)
        assert log.returncode == 0, log.stderr.decode()
        text = log.stdout.decode()
        write_lines = [line for line in text.splitlines() if "Write" in line and "tool_call" in line]
        assert write_lines, text
        assert any("/workspace/hello.txt" in line for line in write_lines), text

        log_json = executor(world, "log", job_id, "--json")
        events = [json.loads(line) for line in log_json.stdout.decode().splitlines()]
        calls = [e["data"] for e in events if e["kind"] == "tool_call"]
        assert any(c.get("name") == "Write" and c.get("file_path") == "/workspace/hello.txt" for c in calls)

        assert server.stop() == 0
        assert server.stop_seconds < 60

    # committed into the repository, owned by the repository's owner
    assert (repo / "hello.txt").read_text() == "hello from the agent\n"
    assert (repo / "hello.txt").stat().st_uid == 1000
    assert (repo / "README.md").read_text() == "app\n"
    assert spool_files(world) == [] and len(spool_files(world, "accepted")) == 1
    assert leftovers(docker_client, job_id) == []


def _check_token_never_stored_or_printed(world, tmp_path, serve, bash_command: str) -> None:
    repo = world.repo("app")
    script = {
        "cli-secret": [
            Turn.tool("Bash", {"command": bash_command, "description": "work"}),
            Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": "done\n"}),
            Turn.text("Finished."),
        ]
    }
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f out.txt")
        # DEBUG: the most a person can make it log
        server = serve(extra_env={"EXECUTOR_LOG_LEVEL": "DEBUG"})
        job_id = submit(world, job_file(tmp_path / "job.json", repo, prompt="cli-secret: work"))
        view = wait_cli_status(world, server, job_id, {"succeeded"})
        assert view["status"] == "succeeded", (view["reason"], view["error"])
        # the credential did reach the agent: the scripted API saw it
        seen = [r.headers.get("x-api-key", "") + r.headers.get("authorization", "") for r in api.requests
                if r.is_messages]
        assert seen and all(TOKEN_VALUE in s for s in seen)

        show_out = executor(world, "show", job_id, "--json")
        plain_show = executor(world, "show", job_id)
        log_out = executor(world, "log", job_id)
        log_json = executor(world, "log", job_id, "--json")
        jobs_out = executor(world, "jobs", "--json")
        db = world.home / "executor.db"
        wal = Path(f"{db}-wal")
        # read the database while serve still runs: the WAL holds the newest pages
        db_bytes = db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
        assert server.stop() == 0

    db_bytes += db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert job_id.encode() in db_bytes  # the search does look at the stored rows
    secret = TOKEN_VALUE.encode()
    assert secret not in db_bytes
    for done in (show_out, plain_show, log_out, log_json, jobs_out):
        assert done.returncode == 0
        assert secret not in done.stdout and secret not in done.stderr
    assert b"tool_call" in log_out.stdout  # the log is not empty
    stderr = server.stderr()
    assert job_id in stderr  # serve did log the job
    assert TOKEN_VALUE not in stderr
    # nothing else under the state root holds it either (spool, status files, job dirs)
    for path in world.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret not in path.read_bytes(), path


def test_runner_token_never_stored_or_printed(world, tmp_path, serve):
    _check_token_never_stored_or_printed(world, tmp_path, serve, "echo working > work.txt && ls -la")


def test_runner_token_printed_by_the_agent_is_not_stored(world, tmp_path, serve):
    _check_token_never_stored_or_printed(world, tmp_path, serve, "env | sort")


def test_sigterm_during_a_job_requeues_it_and_a_restart_finishes_it(world, tmp_path, serve, docker_client):
    repo = world.repo("app", {"README.md": "app\n", "src/main.py": "print(1)\n"})
    before = tree_digest(repo)
    first = {
        "cli-interrupt": [
            Turn.tool("Bash", {"command": "echo half-done > partial.txt && rm README.md", "description": "start"}),
            Turn.hang(),
        ]
    }
    with ScriptedAPI(first) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f final.txt")
        server = serve("serve-1")
        job_id = submit(world, job_file(tmp_path / "job.json", repo, prompt="cli-interrupt: work then hang"))

        def hanging():
            server.assert_alive()
            # the Bash call ran and the agent is waiting on the hung answer
            return api.remaining("cli-interrupt") == 0 and len(api.conversation) >= 2

        wait_for(hanging, 180, "the agent to reach the hung turn")
        time.sleep(1.0)  # let the Bash tool call's events land
        assert show(world, job_id)["status"] == "running"
        store = Store(world.home / "executor.db")
        try:
            assert any(e.kind == "tool_call" and e.data.get("name") == "Bash" for e in store.events(job_id=job_id))
        finally:
            store.close()

        assert server.stop(timeout=60) == 0, server.stderr()[-3000:]
        assert server.stop_seconds < 60

    view = show(world, job_id)
    assert view["status"] == "queued", (view["reason"], view["error"])
    assert len(view["attempts"]) == 1
    assert tree_digest(repo) == before  # rolled back: the Bash change never reached the repository
    assert not (repo / "partial.txt").exists() and (repo / "README.md").exists()
    assert leftovers(docker_client, job_id) == []
    assert not (world.home / "jobs" / job_id / "upper").exists()

    second = {
        "cli-interrupt": [
            Turn.tool("Write", {"file_path": "/workspace/final.txt", "content": "second attempt\n"}),
            Turn.text("Done this time."),
        ]
    }
    with ScriptedAPI(second) as api:
        world.write_runners(api.base_url)
        server = serve("serve-2")
        view = wait_cli_status(world, server, job_id, {"succeeded"})
        assert view["status"] == "succeeded", (view["reason"], view["error"], server.stderr()[-3000:])
        assert server.stop() == 0

    assert [a["number"] for a in view["attempts"]] == [1, 2]
    store = Store(world.home / "executor.db")
    try:
        assert store.get(job_id).attempts == 2
        assert [j.id for j in store.jobs()] == [job_id]  # still one job, not a copy
    finally:
        store.close()
    assert (repo / "final.txt").read_text() == "second attempt\n"
    assert not (repo / "partial.txt").exists()  # nothing of the interrupted attempt leaked in
    assert (repo / "README.md").read_text() == "app\n"
    assert view["changed_files"] == ["final.txt"]


def test_log_reads_the_store_its_url_names_when_the_state_root_holds_no_database(world, tmp_path):
    """EXECUTOR_DATABASE_URL (a shared store) with no SQLite file under the state root: ``log`` reads the
    named store and returns, instead of waiting for a file that will never appear."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = Store(url)
    store.add_jobs([Job(id="elsewhere", session_id="elsewhere", runner="scripted", model_requested="m",
                        workspace=str(world.repos / "app"), prompt="p", policy_name="default")])
    store.add_event(store.get("elsewhere"), 1, "note", {"text": "seen on the shared store"})
    store.close()
    assert not (world.home / "executor.db").exists()
    done = subprocess.run([str(EXECUTOR), "log", "elsewhere", "--json"], env={**world.env(), "EXECUTOR_DATABASE_URL": url},
                          capture_output=True, timeout=30, cwd=world.root)
    assert done.returncode == 0, done.stderr.decode()
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [(e["kind"], e["data"]) for e in events] == [("note", {"text": "seen on the shared store"})]


def test_submit_wait_and_log_follow_track_a_job_to_its_end(world, tmp_path, serve):
    """`submit --wait` prints the job's events as they come and exits 0 only for a success; `log -f` follows
    a job someone else submitted and ends (non-zero) when it settles otherwise."""
    ok_repo, bad_repo = world.repo("ok", {"a.txt": "a\n"}), world.repo("bad", {"a.txt": "a\n"})
    script = {"wait-ok": [Turn.tool("Bash", {"command": "echo ok > b.txt", "description": "w"}), Turn.text("Done.")],
              "wait-bad": [Turn.tool("Bash", {"command": "sleep 2; echo no > b.txt", "description": "w"}),
                           Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy("failing", test_command="false")
        serve()
        wait_for(lambda: (world.home / "status.json").exists(), 60, "the serving executor's first snapshot")
        waited = executor(world, "submit", "--wait", str(job_file(tmp_path / "ok.json", ok_repo, prompt="wait-ok: go")),
                          timeout=240)
        out = waited.stdout.decode()
        assert waited.returncode == 0, (out, waited.stderr.decode())
        assert "tool_call" in out and "Bash: echo ok > b.txt" in out and out.strip().endswith("succeeded")
        bad_id = executor(world, "submit", str(job_file(tmp_path / "bad.json", bad_repo, prompt="wait-bad: go",
                                                         policy="failing"))).stdout.decode().strip()
        followed = executor(world, "log", "-f", bad_id, timeout=240)
    text = followed.stdout.decode()
    assert followed.returncode == 1 and "tests" in text and "rolled_back (tests_failed)" in text, text


def test_jobs_table_filters_json_version_cancel_and_completion(world):
    from executor.clock import utcnow

    store = world.store()
    for job_id, runner in (("alpha-1", "scripted"), ("alpha-2", "other"), ("beta-1", "scripted")):
        store.add_job(Job(id=job_id, session_id="s-" + job_id[:5], runner=runner, model_requested="m",
                          workspace="/w", prompt="p", policy_name="default"))
    store.transition("alpha-1", Status.queued, Status.running, started_at=utcnow())
    store.transition("alpha-1", Status.running, Status.rolled_back, reason="agent_error")
    store.update_job("alpha-2", host_id="box2")  # claimed by another host sharing the store
    store.close()

    table = executor(world, "jobs").stdout.decode().splitlines()
    assert table[0].split()[:7] == ["ID", "STATUS", "RUNNER", "HOST", "AGE", "RAN", "REASON"]
    assert [j["id"] for j in json.loads(executor(world, "jobs", "--host", "box2", "--json").stdout)] == ["alpha-2"]
    assert [line.split()[0] for line in table[1:]] == ["beta-1", "alpha-2", "alpha-1"]  # newest first
    assert "agent_error" in table[3] and "\x1b[" not in "\n".join(table)  # no colour when not a terminal
    assert [line.split()[0] for line in executor(world, "jobs", "--limit", "1").stdout.decode().splitlines()[1:]] \
        == ["beta-1"]
    assert [j["id"] for j in json.loads(executor(world, "jobs", "--runner", "other", "--json").stdout)] == ["alpha-2"]
    assert [j["id"] for j in json.loads(executor(world, "jobs", "--status", "rolled_back", "--json").stdout)] \
        == ["alpha-1"]

    version = executor(world, "--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("executor, version ")
    number = version.stdout.decode().split()[-1]
    for args in (("--version", "--json"), ("--json", "--version")):  # like every command, it takes --json
        as_json = executor(world, *args)
        assert as_json.returncode == 0, as_json.stderr.decode()
        assert json.loads(as_json.stdout) == {"version": number}

    finished = executor(world, "cancel", "alpha-1")
    assert finished.returncode == 1 and "already ended (rolled_back)" in finished.stderr.decode()
    queued = executor(world, "cancel", "beta-1", "--json")
    assert queued.returncode == 0 and json.loads(queued.stdout)["cancelled"] is True

    env = {**world.env(), "_EXECUTOR_COMPLETE": "bash_complete", "COMP_WORDS": "executor show alp", "COMP_CWORD": "2"}
    completed = subprocess.run([str(EXECUTOR)], env=env, capture_output=True, text=True, timeout=60)
    assert sorted(line.split(",")[-1] for line in completed.stdout.split()) == ["alpha-1", "alpha-2"]


def test_backup_while_serving_and_prune_what_is_old(world, serving, tmp_path):
    import os
    import sqlite3
    from datetime import timedelta

    from executor.clock import utcnow

    old = utcnow() - timedelta(days=40)
    for job_id, finished in (("old-done", old), ("new-done", utcnow())):
        serving.add_job(Job(id=job_id, session_id=f"s-{job_id}", runner="scripted", model_requested="m",
                            workspace="/w", prompt="p", policy_name="default", status=Status.failed,
                            reason="conflict", finished_at=finished))
        (world.home / "jobs" / job_id / "upper").mkdir(parents=True)
        (world.home / "sessions" / f"s-{job_id}" / "home").mkdir(parents=True)
    spool = world.home / "spool" / "accepted"
    (spool / "ancient.json").write_text("{}")
    os.utime(spool / "ancient.json", (time.time() - 40 * 86400,) * 2)
    (spool / "fresh.json").write_text("{}")

    target = tmp_path / "backup.db"
    done = executor(world, "backup", str(target), "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["integrity"] == "ok"
    ids = {row[0] for row in sqlite3.connect(target).execute("SELECT id FROM job")}
    assert {"old-done", "new-done"} <= ids
    assert executor(world, "backup", str(target)).returncode != 0  # never over an existing file

    dry = json.loads(executor(world, "prune", "--older-than", "30d", "--dry-run", "--json").stdout)
    assert dry["jobs"] == ["old-done"] and dry["sessions"] == ["s-old-done"] and dry["spool"] == ["accepted/ancient.json"]
    assert (world.home / "jobs" / "old-done").exists()
    assert executor(world, "prune", "--older-than", "30d").returncode == 0
    assert not (world.home / "jobs" / "old-done").exists() and (world.home / "jobs" / "new-done").exists()
    assert not (world.home / "sessions" / "s-old-done").exists() and (world.home / "sessions" / "s-new-done").exists()
    assert not (spool / "ancient.json").exists() and (spool / "fresh.json").exists()
