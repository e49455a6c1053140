"""A hostile sealed job on the real engine, the real sandbox image and the real CLI: from inside its container
(network none, through executor-forward) it holds 24 connections with 32 MiB bodies to its gateway, or
floods it with thousands of refused requests beside a quiet job. The executor (in this process) holds the
bodies on the job's disk, not in its memory; the flood is one event with its count, and the cap holds."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil

from executor.settings import Settings
from executor.store import Status
from tests.conftest import wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
EXECUTOR = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "executor"
BIG = 32 * 1024 * 1024

# Inside the container: 24 connections to the gateway, each a request head and one byte short of a 32 MiB body;
# then they are held until the job is cancelled.
HOLD = """import socket, threading, time
body = b"x" * (32 * 1024 * 1024)
conns = []
def one():
    s = socket.create_connection(("127.0.0.1", 8080))
    conns.append(s)
    s.sendall(b"POST /v1/messages HTTP/1.1\\r\\nhost: x\\r\\ncontent-type: application/json\\r\\n"
              b"content-length: %d\\r\\n\\r\\n" % len(body))
    s.sendall(memoryview(body)[:-1])  # no copy: 24 of them would not fit the container's memory
for _ in range(24):
    threading.Thread(target=one, daemon=True).start()
time.sleep(600)
"""

# Inside the container: 3000 identical refused requests on one kept-alive connection, then 300 distinct ones.
FLOOD = """import http.client
conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=30)
statuses = set()
for path in ["/v1/models"] * 3000 + [f"/v1/route-{i}" for i in range(300)]:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    statuses.add(response.status)
print("flooded", sorted(statuses))
"""


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run", "timeout": 600000})


def spooled(directory: Path) -> list[int]:
    """Sizes of the unnamed body files this process (the executor) holds open in ``directory``."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{directory}/") and target.endswith(" (deleted)"):
                sizes.append(os.stat(f"/proc/self/fd/{fd}").st_size)
        except OSError:
            continue
    return sorted(sizes)


def test_24_held_32_mib_bodies_from_a_sealed_job_stay_on_its_disk_within_the_executors_reserve(world, run_executor):
    script = {"hold": [bash("python3 hold.py"), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy()
        running = run_executor(world.settings())
        store = running.executor.store
        reserve = Settings().reserve_memory
        before = psutil.Process().memory_info().rss
        world.submit(id="hold", workspace=str(world.repo("hold", {"hold.py": HOLD})), prompt="hold: hold on")
        spool = world.home / "jobs" / "hold" / "bodies"
        limit = running.executor.settings.gateway_connections
        gateways = running.executor.sealer.gateways

        def held() -> bool:  # every connection the gateway has room for is open; the bodies are all on disk
            sizes = spooled(spool)
            return gateways.connections("hold")[0] == limit and sizes and set(sizes) == {BIG - 1}

        wait_for(held, 180, f"{limit} connections open, their bodies of 32 MiB on the job's disk", interval=1)
        grown = psutil.Process().memory_info().rss - before
        open_now, accepted = gateways.connections("hold")
        bodies = spooled(spool)
        store.request_cancel("hold")
        job = wait_status(store, "hold", SETTLED, timeout=120)
    # Every connection the gateway took holds a body on disk (one may be the CLI's own, kept alive and idle);
    # the others wait, unaccepted, in the socket's backlog.
    assert (open_now, accepted) == (limit, limit) and limit - 1 <= len(bodies) <= limit
    # The executor ran the job (its container, its CLI's stream, its gateway) and held the bodies: it grew by
    # less than its reserve, not by 24 x 32 MiB.
    assert grown < reserve, f"the executor grew {grown >> 20} MiB"
    print(f"\nexecutor RSS growth with a job holding 24 x 32 MiB bodies: {grown / 2**20:.1f} MiB")
    assert job.status == Status.cancelled
    assert spooled(spool) == [] and not (world.home / "jobs" / "hold").exists()


def test_a_flood_of_refused_requests_is_one_counted_event_and_the_cap_holds(world, run_executor):
    script = {"flood": [bash("python3 flood.py > flood.txt"), Turn.text("Done.")],
              "quiet": [Turn.tool("Write", {"file_path": "/workspace/ok.txt", "content": "ok\n"}), Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="true")
        running = run_executor(world.settings(budget_cpus=4.0))
        store = running.executor.store
        flood_repo = world.repo("flood", {"flood.py": FLOOD})
        world.submit(id="flood", workspace=str(flood_repo), prompt="flood: flood the gateway")
        world.submit(id="quiet", workspace=str(world.repo("quiet")), prompt="quiet: write ok.txt")
        quiet = wait_status(store, "quiet", SETTLED, timeout=300)
        flood = wait_status(store, "flood", SETTLED, timeout=300)
    assert quiet.status == Status.succeeded, (quiet.reason, quiet.error)
    assert flood.status == Status.succeeded, (flood.reason, flood.error)
    assert (flood_repo / "flood.txt").read_text() == "flooded [403]\n"
    assert not [e for e in store.events(job_id="quiet") if e.kind in ("gateway_refused", "sealed_events_capped")]
    events = store.events(job_id="flood")
    refused = [e.data for e in events if e.kind == "gateway_refused"]
    cap = running.executor.settings.sealed_event_cap
    # 3000 identical refusals are one event with their count; then one event per distinct path up to the cap
    assert [r["count"] for r in refused if r["path"] == "/v1/models"] == [3000]
    assert len(refused) == cap and all(r["count"] == 1 for r in refused if r["path"] != "/v1/models")
    capped = [e.data for e in events if e.kind == "sealed_events_capped"]
    assert len(capped) == 1 and capped[0]["unrecorded"] == {"gateway_refused": 300 - (cap - 1)}
    shown = subprocess.run([str(EXECUTOR), "show", "flood"], env=world.env(), capture_output=True, text=True,
                           timeout=60).stdout
    assert "GET /v1/models: GET /v1/models is not an API route this sandbox may call (3000 times)" in shown, shown
    assert f"counted only: {300 - (cap - 1)} gateway_refused" in shown
    assert json.loads(subprocess.run([str(EXECUTOR), "show", "flood", "--json"], env=world.env(),
                                     capture_output=True, text=True, timeout=60).stdout)["api"]["unrecorded"] == {
        "gateway_refused": 300 - (cap - 1)}
