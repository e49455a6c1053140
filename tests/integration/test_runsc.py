"""Jobs under gVisor (``runtime = "runsc"``): the agent's, the tests' and the evaluation's containers run on
gVisor's own kernel, and everything the executor promises under runc holds the same — a sealed job reaches its
API only through the gateway socket and never holds the credential, the egress list is all it reaches, memory
and pids limits, stall detection and kill, the disk cap. The runc suites' own tests run again here with
``EXECUTOR_DEFAULT_RUNTIME=runsc`` (the ``world`` fixture below), so the two runtimes are held to one test.

Needs runsc registered with the engine as the README says (`.ci/setup` does it); fails, never skips, without."""

from __future__ import annotations

import pytest

from executor.store import Status
from tests.conftest import wait_status
from tests.integration.test_containment import (  # noqa: F401 - collected again under runsc
    test_a_job_writing_past_its_disk_cap_is_stopped_and_leaves_nothing,
    test_a_jobs_tmpfs_is_capped_by_its_size,
)
from tests.integration.test_governor import (  # noqa: F401 - collected again under runsc
    FORK_BOMB,
    test_memory_hog_is_reported_as_out_of_memory,
    test_silent_job_is_stalled_killed_and_its_slot_freed,
    test_wall_clock_timeout_fails_and_rolls_back,
)
from tests.integration.test_pipeline import (  # noqa: F401 - collected again under runsc
    test_agent_writes_and_edits_then_tests_pass_commits,
    test_cancel_of_a_running_job_rolls_back,
    test_escape_attempts_are_contained,
    test_failing_tests_roll_back_and_record_the_output,
)
from tests.integration.test_sealed import (  # noqa: F401 - collected again under runsc
    test_a_sealed_job_succeeds_and_its_container_never_holds_the_credential,
    test_inside_a_sealed_job_only_the_egress_list_is_reachable,
    test_killing_the_forwarder_fails_that_job_only,
)
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}


@pytest.fixture
def world(world, docker_client):
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("the engine has no runsc runtime: install gVisor (apt install runsc) and register it as the "
                    "README's gVisor section shows (.ci/setup does)", pytrace=False)
    world.runtime = "runsc"
    return world


def test_the_agent_and_its_tests_run_on_gvisors_kernel(world, run_executor):
    probe = "dmesg | head -n 3 > kernel.txt; uname -r >> kernel.txt"
    script = {"probe": [Turn.tool("Bash", {"command": probe, "description": "kernel"}), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        # the tests' container must itself be on gVisor: its own dmesg says so, beside the agent's record
        world.write_policy(test_command="grep -q 'Starting gVisor' kernel.txt && dmesg | grep -q 'Starting gVisor'")
        running = run_executor(world.settings())
        repo = world.repo("probe")
        world.submit(id="probe", workspace=str(repo), prompt="probe: which kernel")
        store = running.executor.store
        job = wait_status(store, "probe", SETTLED, timeout=180)
    assert job.status == Status.succeeded, (job.reason, job.error, job.test_output)
    assert job.policy["runtime"] == "runsc"  # fixed at intake from EXECUTOR_DEFAULT_RUNTIME
    kernel = (repo / "kernel.txt").read_text()
    assert "Starting gVisor" in kernel
    assert kernel.strip().splitlines()[-1] != _host_release()  # not the host's kernel


def test_a_policy_naming_runc_keeps_the_hosts_kernel_under_a_runsc_default(world, run_executor):
    script = {"plain": [Turn.tool("Bash", {"command": "uname -r > kernel.txt", "description": "k"}),
                        Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(runtime="runc")
        running = run_executor(world.settings())
        repo = world.repo("plain")
        world.submit(id="plain", workspace=str(repo), prompt="plain: which kernel")
        job = wait_status(running.executor.store, "plain", SETTLED, timeout=120)
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert job.policy["runtime"] == "runc"
    assert (repo / "kernel.txt").read_text().strip() == _host_release()


def _host_release() -> str:
    import os

    return os.uname().release


def test_a_fork_bomb_ends_its_own_sandbox_and_nothing_else(world, run_executor):
    """Under runsc the pids limit holds by ending the bomb's sandbox (the engine's cgroup counts gVisor's host
    threads, which grow with the tasks it runs: ``host_pids_limit``), where runc refuses the forks."""
    script = {"bomb": [Turn.tool("Bash", {"command": FORK_BOMB, "description": "fork"}), Turn.text("Done.")],
              "neighbour": [Turn.tool("Bash", {"command": "sleep 3; echo fine > n.txt", "description": "w"}),
                            Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(pids=64, heartbeat_interval="1s", test_command="true")
        running = run_executor(world.settings())
        store = running.executor.store
        repo = world.repo("bomb")
        world.submit(id="bomb", workspace=str(repo), prompt="bomb: fork")
        world.submit(id="neighbour", workspace=str(world.repo("neighbour")), prompt="neighbour: work")
        bombed = wait_status(store, "bomb", SETTLED, timeout=180)
        neighbour = wait_status(store, "neighbour", SETTLED, timeout=180)
    assert neighbour.status == Status.succeeded, (neighbour.reason, neighbour.error)
    assert bombed.status == Status.rolled_back, (bombed.reason, bombed.error)
    assert list(repo.iterdir()) == []  # nothing of it committed
