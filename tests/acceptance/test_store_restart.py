"""PostgreSQL restarted under two hosts mid-run (an upgrade of the database server), then away for longer
than the hosts' timeout: claims and heartbeats pause, job threads wait for the server or hand their jobs
back to their host, and nothing is lost: every job ends once with its change applied once, no job ends
``internal``, no host is judged lost, both hosts serve on. Real PostgreSQL 15 (a cluster of this test's own: it is restarted), the real engine, image and CLI.
"""

from __future__ import annotations

from collections import Counter

import pytest

from executor.store import Status, Store
from tests.acceptance.test_multihost import SETTLED, Host, _repos
from tests.conftest import wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn


@pytest.fixture
def restartable_pg():
    """A cluster of this test's own (restarting the session's would cut other tests' connections)."""
    from tests.postgres import PostgresCluster

    try:
        cluster = PostgresCluster().start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


def _at_work(store: Store, names: list[str]) -> list[str]:
    return [n for n in names if any(e.kind == "tool_call" for e in store.events(job_id=n))]


def test_a_database_restart_under_two_hosts_loses_nothing(world, docker_client, restartable_pg, tmp_path):
    url = restartable_pg.migrated_database()
    names = [f"pg-{i}" for i in range(8)]
    repos = dict(zip(names, _repos(world, world.repos, names), strict=True))
    work = {n: [Turn.tool("Bash", {"command": f"sleep 8; echo {n} > out.txt", "description": "slow"}),
                Turn.text("Done.")] for n in names}
    with ScriptedAPI({f"{n}: work": turns for n, turns in work.items()}, replay=True) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.5, memory="512m", test_command="test -f out.txt", heartbeat_interval="1s",
                           stall_after="120s")
        hosts = [Host(world, name, url, [world.repos], 1.0, "2g", tmp_path) for name in ("host-a", "host-b")]
        store = Store(url)
        try:
            for host in hosts:
                host.start()
            for i, n in enumerate(names):
                hosts[i % 2].submit(n, repos[n], f"{n}: work")
            wait_for(lambda: len(_at_work(store, names)) >= 3, 180, "agents at work on both hosts")
            restartable_pg.restart()  # every session cut; the server is away for a moment
            wait_for(lambda: len(_at_work(store, names)) >= 6, 240, "more agents at work")
            restartable_pg.away(8)  # longer than the hosts' timeout (5 s): no lease may lapse for it
            jobs = {n: wait_status(store, n, SETTLED, timeout=400) for n in names}
            assert all(host.process.poll() is None for host in hosts), "a host exited on the restart"
            for host in hosts:
                host.stop()
            events = {n: store.events(job_id=n) for n in names}
        finally:
            for host in hosts:
                if host.process and host.process.poll() is None:
                    host.kill()
            store.close()

    logs = {host.name: host.log.read_text() for host in hosts}
    for n, job in jobs.items():
        assert job.status == Status.succeeded, (n, job.reason, job.error, {h: t[-2000:] for h, t in logs.items()})
        assert (repos[n] / "out.txt").read_text() == f"{n}\n"
        states = Counter(e.data.get("status") for e in events[n] if e.kind == "state")
        assert states["committing"] == 1 and states["succeeded"] == 1  # applied once, ended once
        assert not any(e.data.get("reason") == "internal" for e in events[n])
        assert not any(e.kind == "host_lost" for e in events[n])  # no host's lease lapsed falsely
    assert any("database is unreachable" in t or "store unavailable" in t or "job held" in t
               for t in logs.values()), "the restart went unnoticed: the test proved nothing"
