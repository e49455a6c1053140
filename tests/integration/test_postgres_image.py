"""The compose profile's PostgreSQL (``postgres/Dockerfile``) as the hosts reach it: built and started with
testcontainers on the host network (a free loopback port; no bridge here), a password login, the store's
migrations and a claim through it; a wrong password is refused. Ryuk, testcontainers' reaper, is off: its
image would come from a registry (the container is removed by the context manager instead)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import psycopg
import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.core.container import DockerContainer  # noqa: E402
from testcontainers.core.image import DockerImage  # noqa: E402

from executor.policy import Policy  # noqa: E402
from executor.scheduling import admission  # noqa: E402
from executor.scheduling.governor import Governor  # noqa: E402
from executor.settings import parse_size  # noqa: E402
from executor.store import Job, Status, Store  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.postgres import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TAG = "executor-postgres:15"


@pytest.fixture(scope="module")
def postgres_image(docker_client) -> str:
    DockerImage(path=ROOT / "postgres", tag=TAG, clean_up=False, network_mode="host").build()
    return TAG


def _connects(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
        return True
    except psycopg.OperationalError:
        return False


def test_the_compose_postgres_image_serves_the_shared_queue(postgres_image):
    port, password = free_port(), secrets.token_urlsafe(16)
    server = (DockerContainer(postgres_image, network_mode="host")
              .with_env("POSTGRES_PASSWORD", password).with_env("PGPORT", str(port)))
    with server:
        dsn = f"postgresql://executor:{password}@127.0.0.1:{port}/executor"
        wait_for(lambda: _connects(dsn), 90, "the PostgreSQL container to take logins")
        store = Store(f"postgresql+psycopg://executor:{password}@127.0.0.1:{port}/executor")  # migrates
        try:
            store.add_job(Job(id="pg-1", session_id="pg-1", runner="r", model_requested="m", workspace="/w/pg-1",
                              prompt="p", policy_name="default", policy=Policy(cpus=1.0, memory="512m").model_dump()))
            plan = admission.claim(store, Governor(2.0, parse_size("8g"), parse_size("256m")),
                                   admission.Host("host-a", ("/w",)), {}, {})
            assert [j.id for j, _ in plan.starts] == ["pg-1"]
            assert store.get("pg-1").status == Status.running and store.get("pg-1").host_id == "host-a"
        finally:
            store.close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"postgresql://executor:wrong@127.0.0.1:{port}/executor", connect_timeout=5)
    assert not server.get_docker_client().client.containers.list(all=True, filters={"ancestor": postgres_image})
