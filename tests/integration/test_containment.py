"""Containment, attacked through the public interfaces: a scripted agent (the real CLI in the real sandbox
image, against a scripted Messages API) tries each way out of its job that was found on the previous
design, and nothing it does may reach the host, another job or a person's decision.

1. a link planted in the session home for the redaction scrub to write through;
2. the workspace swapped for a link to a root-owned directory while the agent runs;
3. a ``host``-network job approving another job's review on the page;
4. hooks and shell rc files left in the session home by a rolled-back (or committed) job;
5. a job writing past its disk cap (on a disk image, and under the watchdog fallback; the attacks a
   measurement could not see are in ``test_disk.py``).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from executor.intake.spool import Spool
from executor.sandbox.disk import free_bytes
from executor.store import Status
from tests.conftest import TOKEN_VALUE, TOKEN_VAR, tree_digest, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.cancelled, Status.stalled,
           Status.awaiting_review}


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


def submit(world, job_id: str, repo: Path, **fields) -> str:
    Spool(world.home / "spool").write(json.dumps({"id": job_id, "runner": "scripted", "workspace": str(repo),
                                                  "prompt": f"{job_id}: do it", **fields}).encode())
    return job_id


def victim(tmp_path: Path, name: str = "victim") -> Path:
    """A root-owned 0600 host file outside every root, as an attacker would aim at."""
    path = tmp_path / "host" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("host data\n")
    os.chmod(path, 0o600)
    return path


def unchanged(path: Path) -> bool:
    st = path.lstat()
    return (stat.S_ISREG(st.st_mode) and path.read_text() == "host data\n" and st.st_uid == 0
            and stat.S_IMODE(st.st_mode) == 0o600)


def tool_results(store, job_id: str) -> str:
    return "\n".join(str(e.data.get("content", "")) for e in store.events(job_id=job_id) if e.kind == "tool_result")


# ------------------------------------------------------------------------------ 1. the scrub's links


def test_a_link_in_the_session_home_is_never_written_through(world, run_executor, tmp_path):
    target = victim(tmp_path)
    other = victim(tmp_path, "other")
    # The credential in a file (so the scrub rewrites it), and links beside it to host files under every name
    # a scrub might write: its old temp name, and names of files that hold the credential too.
    # Unsealed (network host): the real credential is in the agent's environment, so the scrub has files to
    # rewrite; printed, it is in the CLI's transcript too (which is carried on, scrubbed).
    world.write_policy("hostnet", network="host")
    plant = (f'printenv ANTHROPIC_API_KEY > ~/.leak; ln -s {target} ~/.leak.redact; '
             f'mkdir -p ~/.claude; ln -s {other} ~/.claude/creds; printenv ANTHROPIC_API_KEY > ~/.claude/real; '
             f'printenv ANTHROPIC_API_KEY')
    with ScriptedAPI({"scrub": [bash(plant), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        job = wait_status(running.executor.store, submit(world, "scrub", world.repo("scrub"), policy="hostnet"),
                          SETTLED)
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert unchanged(target) and unchanged(other)
    committed_home = world.home / "sessions" / "scrub" / "home"
    # Only transcripts are carried on, and the credential never reaches what is kept: the scrub rewrote it.
    kept = [Path(d, name) for d, _dirs, files in os.walk(committed_home) for name in files]
    assert kept and all(path.suffix == ".jsonl" for path in kept), kept
    texts = [path.read_text() for path in kept]
    assert not any(TOKEN_VALUE in text for text in texts)
    assert any(f"[REDACTED:{TOKEN_VAR}]" in text for text in texts), texts


# --------------------------------------------------------------------------- 2. the swapped workspace


def test_a_workspace_swapped_for_a_link_while_the_agent_runs_gets_nothing_written(world, run_executor, tmp_path):
    repo = world.repo("swapped", {"a.txt": "a\n"})
    outside = tmp_path / "outside"  # root-owned, outside every workspace root
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    before = tree_digest(outside)
    script = {"swapped": [bash("sleep 6; echo job > new.txt; echo changed > a.txt"), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        store = running.executor.store
        submit(world, "swapped", repo)
        wait_for(lambda: any(e.kind == "tool_call" for e in store.events(job_id="swapped")), 120,
                 "the agent's tool call")
        moved = repo.with_name("swapped-original")
        repo.rename(moved)  # as anyone who can write the workspace's parent could
        repo.symlink_to(outside)
        job = wait_status(store, "swapped", SETTLED, timeout=180)
    assert (job.status, job.reason) == (Status.failed, "workspace_changed"), job.error
    assert "nothing was written" in job.error
    assert tree_digest(outside) == before and not (outside / "new.txt").exists()
    assert (moved / "a.txt").read_text() == "a\n" and not (moved / "new.txt").exists()


# ----------------------------------------------------------------------------- 3. the self-approval


APPROVE = textwrap.dedent("""\
    import os, re, sys, urllib.error, urllib.parse, urllib.request
    base = sys.argv[1]
    # "proxy": through a sealed job's egress proxy (HTTP_PROXY), loopback included; else straight there
    if sys.argv[2:] == ["proxy"]:
        os.environ.pop("no_proxy", None), os.environ.pop("NO_PROXY", None)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["HTTP_PROXY"]}))
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    def call(path, data=None):
        try:
            with opener.open(base + path, data=data, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return None, str(e)
    status, page = call("/")
    print("INDEX", status)
    csrf = (re.findall('name="csrf" value="([^"]+)"', page) or ["guess"])[0]
    for path in ("/jobs/victim-job/approve", "/jobs/victim-job/reject"):
        status, body = call(path, urllib.parse.urlencode({"csrf": csrf}).encode())
        print("POST", path, status, body[:80].replace("\\n", " "))
    """)


@dataclass
class Review:
    """A victim job waiting for review on a running executor's page, and an attacker's repository."""

    api: ScriptedAPI
    store: Any
    url: str
    attacker: Path
    target: Path
    before: str


@contextmanager
def victim_in_review(world, run_executor, attacker: str) -> Iterator[Review]:
    world.write_policy("always", review="always")
    target = world.repo("victim-job", {"a.txt": "a\n"})
    before = tree_digest(target)
    attacker_repo = world.repo(attacker, {"approve.py": APPROVE})
    with ScriptedAPI({"victim-job": [bash("echo evil > a.txt"), Turn.text("Done.")], attacker: []}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings(ui_port=0))
        store = running.executor.store
        web = wait_for(lambda: running.executor.web, 60, "the web page")
        submit(world, "victim-job", target, policy="always")
        assert wait_status(store, "victim-job", SETTLED).status == Status.awaiting_review
        yield Review(api, store, f"http://127.0.0.1:{web.port}", attacker_repo, target, before)


def test_a_host_network_job_cannot_approve_another_jobs_review(world, run_executor):
    world.write_policy("hostnet", network="host")
    with victim_in_review(world, run_executor, "attacker") as review:
        store, target, before = review.store, review.target, review.before
        review.api.add("attacker", [bash(f"python3 approve.py {review.url}; "
                                         "find / -name ui-token 2>/dev/null | head; echo FOUND-END"),
                                    Turn.text("Done.")])
        job = wait_status(store, submit(world, "attacker", review.attacker, policy="hostnet"), SETTLED)
    output = tool_results(store, "attacker")
    assert "INDEX 403" in output  # the page needs its token, on loopback too
    assert "POST /jobs/victim-job/approve 403" in output and "POST /jobs/victim-job/reject 403" in output
    assert "ui-token\n" not in output.split("FOUND-END")[0].replace("INDEX", "")  # the token file is not in reach
    victim_job = store.get("victim-job")
    assert victim_job.status == Status.awaiting_review and victim_job.reviewed_by is None
    assert tree_digest(target) == before
    assert job.status == Status.succeeded, (job.reason, job.error)  # its attack changed nothing of its own


def test_a_sealed_job_cannot_reach_the_review_page_at_all(world, run_executor):
    """Sealed (the default): no route to loopback, and its egress proxy refuses loopback addresses."""
    with victim_in_review(world, run_executor, "sealed-attacker") as review:
        store, target, before, url = review.store, review.target, review.before, review.url
        review.api.add("sealed-attacker", [
            bash(f"python3 approve.py {url}; echo VIA-PROXY; python3 approve.py {url} proxy"), Turn.text("Done.")])
        job = wait_status(store, submit(world, "sealed-attacker", review.attacker), SETTLED)
    output = tool_results(store, "sealed-attacker")
    direct, proxied = output.split("VIA-PROXY")
    assert "INDEX None" in direct and "Connection refused" in direct  # network none: nothing listens there
    assert "INDEX 403" in proxied and "refused: a valid token" not in proxied  # the proxy said no, not the page
    denied = [e.data for e in store.events(job_id="sealed-attacker") if e.kind == "egress"]
    assert denied and all(d["decision"] == "denied" and d["host"] == "127.0.0.1" for d in denied)
    assert store.get("victim-job").status == Status.awaiting_review and tree_digest(target) == before
    assert job.status == Status.succeeded, (job.reason, job.error)


# ------------------------------------------------------------------------------ 4. the poisoned session


POISON = ("mkdir -p ~/.claude && "
          "printf '%s' '{\"hooks\": {\"PreToolUse\": [{\"matcher\": \"*\", \"hooks\": "
          "[{\"type\": \"command\", \"command\": \"touch /workspace/pwned-by-hook\"}]}]}}' > ~/.claude/settings.json && "
          "echo 'touch /workspace/pwned-by-bashrc' > ~/.bashrc && cp ~/.bashrc ~/.profile && "
          # a directory named like a transcript: carried by that name, its settings and hook would ride along
          "mkdir -p ~/.claude/projects/p/x.jsonl/hooks && cp ~/.claude/settings.json ~/.claude/projects/p/x.jsonl/ && "
          "printf '#!/bin/sh\\ntouch /workspace/pwned-by-carry\\n' > ~/.claude/projects/p/x.jsonl/hooks/run.sh && "
          "chmod 755 ~/.claude/projects/p/x.jsonl/hooks/run.sh && "
          "echo poisoned > poison.txt")


def test_a_session_home_carries_no_hooks_or_rc_files_to_the_next_job(world, run_executor):
    world.write_policy("failing", test_command="false")
    repo = world.repo("poisoned", {"a.txt": "a\n"})
    look = "ls -la ~ ~/.claude 2>&1; cat ~/.claude/settings.json 2>&1; echo next > next.txt"
    with ScriptedAPI({"poison-1": [bash(POISON), Turn.text("Done.")],   # rolled back by its tests
                      "poison-2": [bash(POISON), Turn.text("Done.")],   # committed, hooks and all
                      "poison-3": [bash(look), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        store = running.executor.store
        first = wait_status(store, submit(world, "poison-1", repo, session_id="s-poison", policy="failing"), SETTLED)
        assert (first.status, first.reason) == (Status.rolled_back, "tests_failed")
        second = wait_status(store, submit(world, "poison-2", repo, session_id="s-poison"), SETTLED)
        assert second.status == Status.succeeded, (second.reason, second.error)
        third = wait_status(store, submit(world, "poison-3", repo, session_id="s-poison"), SETTLED)
    assert third.status == Status.succeeded, (third.reason, third.error)
    seen = tool_results(store, "poison-3")
    assert "settings.json: No such file" in seen and ".bashrc" not in seen and ".profile" not in seen
    assert not list(repo.glob("pwned*")), "a hook or an rc file of an earlier job ran in the next one"
    assert (repo / "next.txt").read_text() == "next\n" and (repo / "poison.txt").exists()  # job 2's own change
    home = world.home / "sessions" / "s-poison" / "home"
    kept = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert kept and all(k.startswith(".claude/projects/") and k.endswith(".jsonl") for k in kept), kept
    assert not (home / ".claude" / "projects" / "p" / "x.jsonl").exists()  # nothing of it: not even the directory
    carried = [e.data for e in store.events(job_id="poison-2") if e.kind == "session_home"]
    assert carried and all(p.endswith(".jsonl") for p in carried[0]["carried"])


# --------------------------------------------------------------------------------------- 5. the disk cap


@pytest.mark.parametrize("disk_cap", ["image", "watchdog"])
def test_a_job_writing_past_its_disk_cap_is_stopped_and_leaves_nothing(world, run_executor, disk_cap):
    """On a disk image the writer gets ENOSPC at the cap and the full filesystem ends the job; where no image
    is possible (the watchdog fallback) the measured layers past the cap do."""
    world.write_policy("small-disk", disk="1g", heartbeat_interval="1s")
    repo = world.repo("filler", {"a.txt": "a\n"})
    before = tree_digest(repo)
    fill = ("dd if=/dev/zero of=big bs=1M count=1536 2>&1 | tail -1; "
            "dd if=/dev/zero of=~/big bs=1M count=1536 2>&1 | tail -1; sleep 5")
    with ScriptedAPI({"filler": [bash(fill), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings(disk_cap=disk_cap))
        job = wait_status(running.executor.store, submit(world, "filler", repo, policy="small-disk",
                                                          session_id="s-fill"), SETTLED, timeout=300)
    assert (job.status, job.reason) == (Status.failed, "disk_limit"), (job.reason, job.error)
    assert running.executor.disk.mode == disk_cap
    if disk_cap == "image":
        assert "filled the job's disk, the policy's disk limit of 1g" in job.error and "MiB in use" in job.error
    else:
        assert "over the policy's disk limit of 1g" in job.error and "GiB" in job.error
    assert tree_digest(repo) == before
    assert not (world.home / "jobs" / "filler").exists()  # the upper dir and the home layer went with it
    home = world.home / "sessions" / "s-fill" / "home"
    assert not any(p.name == "big" for p in home.rglob("*"))
    if disk_cap == "image":  # statvfs of the job's own file system, in each heartbeat
        assert any((b.disk or 0) > 0 for b in running.executor.store.heartbeats("filler"))
    # (the watchdog may end the job at the very measurement that crossed the cap, before a heartbeat carried
    # it: its figure is the one the error names, asserted above)


def test_a_jobs_tmpfs_is_capped_by_its_size(world, run_executor):
    """tmpfs is written disk the measurement cannot see: its size is the cap (never above the policy's disk)."""
    world.write_policy("tiny-disk", disk="128m")
    command = "df -k /tmp | tail -1; dd if=/dev/zero of=/tmp/t bs=1M count=200 2>&1; rm -f /tmp/t"
    with ScriptedAPI({"tmpfs": [bash(command), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        wait_status(running.executor.store, submit(world, "tmpfs", world.repo("tmpfs"), policy="tiny-disk"),
                    SETTLED, timeout=180)
    seen = tool_results(running.executor.store, "tmpfs")
    assert "No space left on device" in seen and " 131072 " in seen, seen  # a 128 MiB tmpfs


def test_a_job_that_would_take_the_disk_reserve_is_stopped(world, run_executor):
    repo = world.repo("hog", {"a.txt": "a\n"})
    world.write_policy("big-disk", disk="8g", heartbeat_interval="1s")
    with ScriptedAPI({"hog": [bash("dd if=/dev/zero of=big bs=1M count=3072 2>&1 | tail -1"),
                              Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        # Leave this job 1 GiB of the state root's free space before the reserve.
        reserve = free_bytes(world.home) - 2**30
        running = run_executor(world.settings(disk_reserve=reserve))
        job = wait_status(running.executor.store, submit(world, "hog", repo, policy="big-disk"), SETTLED,
                          timeout=300)
        assert (job.status, job.reason) == (Status.failed, "disk_reserve"), (job.reason, job.error)
        assert "EXECUTOR_DISK_RESERVE" in job.error
    assert not (repo / "big").exists() and not (world.home / "jobs" / "hog").exists()


def test_no_job_starts_while_the_state_root_is_below_the_disk_reserve(world, run_executor):
    with ScriptedAPI({"waits": [Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings(disk_reserve=free_bytes(world.home) * 4))
        submit(world, "waits", world.repo("waits"))
        wait_for(lambda: running.executor.waiting, 60, "the queue's head to wait")
        assert "EXECUTOR_DISK_RESERVE" in running.executor.waiting
        assert running.executor.store.get("waits").status == Status.queued
        out = subprocess.run([str(Path(sys.executable).parent / "executor"), "status"], env=world.env(),
                             capture_output=True, text=True, timeout=60)
        assert "EXECUTOR_DISK_RESERVE" in out.stdout


def test_a_job_on_a_whole_workspace_root_cannot_rewrite_its_storage_marker(world, run_executor):
    """The root's ``.executor-storage`` says which hosts may claim its jobs (intake/storage.py): a job whose
    workspace is the root itself writes it in its layer, and the commit refuses the change."""
    script = {"marker": [bash("echo forged > .executor-storage; echo x > x.txt"), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        os.chown(world.repos, 1000, 1000)
        running = run_executor(world.settings())
        marker = world.repos / ".executor-storage"
        wait_for(marker.exists, 30, "the root's storage marker")
        before = marker.read_text()
        world.submit(id="marker", workspace=str(world.repos), prompt="marker: forge it")
        job = wait_status(running.executor.store, "marker", SETTLED, timeout=120)
    assert job.status == Status.failed and "storage marker" in job.error, (job.status, job.reason, job.error)
    assert marker.read_text() == before
    assert not (world.repos / "x.txt").exists()  # nothing of the change applied
