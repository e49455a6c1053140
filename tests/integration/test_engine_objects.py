"""Nothing the executor asks the engine to make exists without being found again (the real engine): a
container naming a volume that is not there is refused before the engine makes it (empty and unlabelled),
and a volume an engine fault left without its labels is still found by its name, which carries the
executor's instance: removed with its job's objects and by the sweep, kept while its job is live."""

from __future__ import annotations

import secrets

import docker
import pytest

from executor.errors import SandboxError
from executor.sandbox.deployment import ContainerSpec, Limits, Sandbox
from tests.conftest import SANDBOX_IMAGE


@pytest.fixture
def sandbox(docker_client):
    instance = f"test{secrets.token_hex(4)}"
    yield Sandbox(docker_client, SANDBOX_IMAGE, instance)
    for volume in docker_client.volumes.list(filters={"name": f"executor-{instance}-"}):
        volume.remove(force=True)


def _names(client: docker.DockerClient, instance: str) -> set[str]:
    return {v.name for v in client.volumes.list(filters={"name": f"executor-{instance}-"})}


def test_a_container_on_a_missing_volume_is_refused_and_nothing_is_made(sandbox, docker_client):
    spec = ContainerSpec(name="executor-lost-a1-agent", command=["true"], user="1000:1000",
                         volume="executor-lost-a1", limits=Limits(0.5, 256 * 2**20, 64), network="none",
                         labels={"io.executor.job": "lost", "io.executor.attempt": "1", "io.executor.role": "agent"})
    with pytest.raises(SandboxError, match="volume executor-.*-lost-a1 is missing"):
        sandbox.start(spec)
    assert _names(docker_client, sandbox.instance) == set()  # the engine made no volume for it
    assert not sandbox.containers("lost")


def test_an_unlabelled_volume_named_as_ours_is_found_by_its_name(sandbox, docker_client):
    for name in ("executor-live-1-a1", "executor-gone-a1-a2-home", "executor-gone-b-a1"):
        docker_client.volumes.create(name=sandbox.named(name))  # as an engine fault leaves them: no labels
    sandbox.remove_job_objects("gone-b")
    assert _names(docker_client, sandbox.instance) == {sandbox.named("executor-live-1-a1"),
                                                       sandbox.named("executor-gone-a1-a2-home")}
    removed = sandbox.sweep(["live-1"])
    assert removed == [sandbox.named("executor-gone-a1-a2-home")]
    assert _names(docker_client, sandbox.instance) == {sandbox.named("executor-live-1-a1")}


def test_a_runtime_the_engine_lacks_is_refused_with_how_to_register_it(sandbox, docker_client):
    docker_client.volumes.create(name=sandbox.named("executor-rt-a1"), labels={"io.executor": "1"})
    spec = ContainerSpec(name="executor-rt-a1-agent", command=["true"], user="1000:1000", volume="executor-rt-a1",
                         limits=Limits(0.5, 256 * 2**20, 64), network="none", runtime="runsc-not-registered",
                         labels={"io.executor.job": "rt", "io.executor.attempt": "1", "io.executor.role": "agent"})
    with pytest.raises(SandboxError, match="the engine has no runtime 'runsc-not-registered'"):
        sandbox.start(spec)
    assert not sandbox.containers("rt")
