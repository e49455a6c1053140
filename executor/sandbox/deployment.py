"""Deployment: starting, stopping and sweeping the executor's containers and volumes on the Docker engine.

Owns every call that creates or removes an engine object, the hardening every job container gets
(non-root, all capabilities dropped, no-new-privileges, read-only root, hard cpu/memory/pids limits)
and the labels by which the executor finds its own objects again after a restart. Nothing it asks the
engine to make exists without them: a container starts only on volumes that exist (the engine would make
a missing one, empty and unlabelled), each mount carries the labels all the same, and a volume an engine
fault left without its labels (made, but its metadata never written) is still found by its name, which
carries the instance.

``Deployment`` is the small interface the rest of the executor uses; ``Sandbox`` implements it on the Docker
engine, and unit tests of scheduling use a fake.

Must never: talk to the agent (that is ``runtime.py``), run a container as root, use a default
network other than the one the policy names, or mount a sealed job's sockets writable.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from ..errors import SandboxError
from .hostpaths import HostPaths

log = logging.getLogger(__name__)

LABEL = "io.executor"  # every object the executor creates carries io.executor=1
LABEL_INSTANCE = "io.executor.instance"  # which executor (state root) owns it: sweeps touch only their own
LABEL_JOB = "io.executor.job"
LABEL_ROLE = "io.executor.role"  # agent | tests | workspace | testview
LABEL_ATTEMPT = "io.executor.attempt"
WORKSPACE_MOUNT = "/workspace"
AGENT_HOME = "/home/agent"
SOCKETS_MOUNT = "/run/executor"  # a sealed job's socket directory, read-only (sandbox/seal.py)


@dataclass(frozen=True)
class Limits:
    cpus: float
    memory: int
    pids: int


@dataclass
class ContainerSpec:
    """One hardened job container."""

    name: str
    command: list[str]
    user: str  # "uid:gid", never root
    volume: str  # mounted at /workspace with nocopy
    limits: Limits
    network: str
    labels: dict[str, str]
    environment: dict[str, str] = field(default_factory=dict)
    tmpfs_size: int = 512 * 2**20  # bytes of each tmpfs (counted against the job's disk limit)
    home_volume: str | None = None  # the agent's home: an overlay volume over the session's committed home
    sockets: str | None = None  # host directory of a sealed job's sockets, bind-mounted read-only
    binds: dict[str, str] = field(default_factory=dict)  # dir (executor's view) -> container path, read-write
    read_only_binds: dict[str, str] = field(default_factory=dict)  # the same, read-only (the agent's configuration)
    runtime: str = "runc"  # the OCI runtime: runc (the host's kernel) or runsc (gVisor)


#: How gVisor is registered with Docker for these jobs: host Unix sockets connect (the sealed job's gateway and
#: egress proxy), and its own network stack is off (Docker's none network is what every job gets).
RUNSC_DAEMON_JSON = ('{"runtimes": {"runsc": {"path": "/usr/bin/runsc", '
                     '"runtimeArgs": ["--host-uds=all", "--network=none"]}}}')


def host_pids_limit(pids: int, runtime: str) -> int:
    """The engine's pids limit for a job's ``pids``. Under runc it is the job's processes. Under runsc the
    engine's cgroup counts gVisor's own host threads: its kernel's (about 100 at rest) and, on the ptrace
    platform, host threads for the tasks it runs; measured here, a sandbox with ``--pids-limit`` 64 could not
    start the CLI, and one with 1,024 ended (exit 2) at 400 sleeping tasks, so ``pids`` is scaled: the job is
    still stopped by its limit (its sandbox ends), at a count of tasks of the same order."""
    return pids if runtime == "runc" else RUNSC_BASE_PIDS + RUNSC_PIDS_PER_TASK * pids


RUNSC_BASE_PIDS = 512
RUNSC_PIDS_PER_TASK = 4


def runtime_hint(runtime: str) -> str:
    """How to give the engine ``runtime``."""
    if runtime == "runsc":
        return ("install gVisor (Debian: apt install runsc), add to /etc/docker/daemon.json "
                f"{RUNSC_DAEMON_JSON} and reload the engine (kill -HUP $(pidof dockerd)); or set the policy's "
                "runtime to runc")
    return f"register the runtime {runtime!r} with the engine"


def connect() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise SandboxError(
            f"cannot reach the Docker engine ({exc}); start dockerd or set DOCKER_HOST"
        ) from None
    return client


def instance_id(home: Path) -> str:
    """A stable name for the executor that owns a state root (two executors never sweep each other)."""
    return hashlib.sha256(str(home).encode()).hexdigest()[:12]


class Deployment(Protocol):
    """What the executor asks of the engine: containers and overlay volumes, found again by label."""

    def check_image(self) -> None: ...
    def image_id(self) -> str: ...
    def start(self, spec: ContainerSpec) -> Container: ...
    def remove(self, container: Container | str) -> None: ...
    def create_overlay_volume(self, name: str, lower: list[str], upper: str, work: str,
                              labels: dict[str, str]) -> None: ...
    def remove_volume(self, name: str) -> None: ...
    def containers(self, job_id: str | None = None, all: bool = True) -> list[Container]: ...
    def remove_job_objects(self, job_id: str) -> None: ...
    def sweep(self, live_jobs: Iterable[str]) -> list[str]: ...


#: What the engine keeps of a job container's output (its json-file log, outside the job's disk cap: the agent
#: can write anything to its stdout): at most two files of 256 MiB. A stream longer than that loses its
#: oldest lines, which only an executor restarted mid-attempt would read again (to adopt the attempt).
LOG_CONFIG = LogConfig(type="json-file", config={"max-size": "256m", "max-file": "2"})

#: The image's ``io.executor.sandbox-interface`` label this executor needs (sandbox/Dockerfile sets it).
#: 2: the sealed sandbox's forwarder (``executor-forward``) is in the image.
#: 3: coverage.py, started by every ``python3`` when ``COVERAGE_PROCESS_START`` is set (the evaluation gate).
#: 4: every agent's CLI (``codex``; ``gemini`` and Node.js 22 it runs on), beside ``claude``.
SANDBOX_INTERFACE = "4"
INTERFACE_LABEL = "io.executor.sandbox-interface"


def image_problem(client: docker.DockerClient, image: str) -> str | None:
    """Why ``image`` cannot run this executor's jobs (missing, or built from another sandbox/Dockerfile)."""
    try:
        found = client.images.get(image)
    except ImageNotFound:
        return f"sandbox image {image!r} is missing"
    have = (found.labels or {}).get(INTERFACE_LABEL)
    if have != SANDBOX_INTERFACE:
        return (f"sandbox image {image!r} was built from another sandbox/Dockerfile (interface "
                f"{have or 'none'}; this executor needs {SANDBOX_INTERFACE})")
    return None


def rebuild_hint(image: str) -> str:
    return (f"build it from this checkout: `docker compose build sandbox`, or `docker build --network host "
            f"-t {image} sandbox/`")


class Sandbox:
    """``Deployment`` on the Docker engine."""

    def __init__(self, client: docker.DockerClient, image: str, instance: str = "default",
                 paths: HostPaths | None = None) -> None:
        self.client = client
        self.image = image
        self.instance = instance
        self.paths = paths or HostPaths()  # the engine resolves paths on the host, not in our container
        self._own = {LABEL: "1", LABEL_INSTANCE: instance}

    def named(self, name: str) -> str:
        """The engine's name for one of our objects: the instance goes into it, so two executors (or two
        test runs) on one engine never claim the same name for jobs that share an id."""
        own = f"executor-{self.instance}-"
        if name.startswith("executor-") and not name.startswith(own):
            return own + name.removeprefix("executor-")
        return name

    def check_image(self) -> None:
        problem = image_problem(self.client, self.image)
        if problem is not None:
            raise SandboxError(f"{problem}: {rebuild_hint(self.image)}")

    def image_id(self) -> str:
        """The sandbox image's id (what a cached test result was measured with)."""
        try:
            return self.client.images.get(self.image).id
        except (ImageNotFound, APIError) as exc:
            raise SandboxError(f"cannot inspect sandbox image {self.image!r}: {exc}") from None

    def start(self, spec: ContainerSpec) -> Container:
        if spec.user.split(":")[0] in ("0", "root"):
            raise SandboxError(f"refusing to run {spec.name} as root")
        self._volumes_exist(spec)
        try:
            return self.client.containers.run(
                self.image,
                spec.command,
                name=self.named(spec.name),
                detach=True,
                user=spec.user,
                environment=spec.environment,
                working_dir=WORKSPACE_MOUNT,
                labels={**self._own, **spec.labels},
                mounts=self._mounts(spec),
                network_mode=spec.network,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                tmpfs=self._tmpfs(spec),
                nano_cpus=int(spec.limits.cpus * 1e9),
                mem_limit=spec.limits.memory,
                memswap_limit=spec.limits.memory,  # no swap beyond the hard limit
                pids_limit=host_pids_limit(spec.limits.pids, spec.runtime),
                init=True,  # reap the agent's children; a killed job leaves no zombies
                log_config=LOG_CONFIG,
                runtime=spec.runtime,
            )
        except (APIError, DockerException) as exc:
            if spec.runtime != "runc" and "runtime" in str(exc):
                # The engine's own refusal ("unknown or invalid runtime name") says nothing of how to get it;
                # asked only then, so a start costs no extra call to the engine.
                raise SandboxError(f"the engine has no runtime {spec.runtime!r}, which the job's policy asks for: "
                                   f"{runtime_hint(spec.runtime)}") from None
            raise SandboxError(f"cannot start container {self.named(spec.name)}: {exc}") from None

    def _volumes_exist(self, spec: ContainerSpec) -> None:
        """Refuse to start on a volume that is not there: the engine would make it, empty (the agent would work
        on nothing) and without our labels."""
        for name in filter(None, (spec.volume, spec.home_volume)):
            try:
                self.client.volumes.get(self.named(name))
            except NotFound:
                raise SandboxError(f"cannot start container {self.named(spec.name)}: its volume "
                                   f"{self.named(name)} is missing") from None
            except APIError as exc:
                raise SandboxError(f"cannot inspect volume {self.named(name)}: {exc}") from None

    def _mounts(self, spec: ContainerSpec) -> list[Mount]:
        # Labelled even so: were a volume removed between the check and the start, the one the engine makes
        # is still ours to sweep.
        labels = {**self._own, **{k: v for k, v in spec.labels.items() if k != LABEL_ROLE}}
        mounts = [Mount(target=WORKSPACE_MOUNT, source=self.named(spec.volume), type="volume", no_copy=True,
                        labels=labels)]
        if spec.home_volume:
            mounts.append(Mount(target=AGENT_HOME, source=self.named(spec.home_volume), type="volume",
                                no_copy=True, labels=labels))
        if spec.sockets:  # made in the executor's view of the state root; the engine needs the host's path
            mounts.append(Mount(target=SOCKETS_MOUNT, source=self.paths.to_host(spec.sockets), type="bind",
                                read_only=True))
        mounts.extend(Mount(target=target, source=self.paths.to_host(source), type="bind")
                      for source, target in spec.binds.items())  # a graded test run's report directory
        mounts.extend(Mount(target=target, source=self.paths.to_host(source), type="bind", read_only=True)
                      for source, target in spec.read_only_binds.items())
        return mounts

    @staticmethod
    def _tmpfs(spec: ContainerSpec) -> dict[str, str]:
        # Home and /tmp are the only writable places besides the workspace; mode 1777 because the
        # agent's uid is the repository owner's and has no entry in the image.
        tmpfs = {"/tmp": f"rw,nosuid,nodev,size={spec.tmpfs_size},mode=1777"}
        if not spec.home_volume:
            tmpfs[AGENT_HOME] = f"rw,nosuid,nodev,size={spec.tmpfs_size},mode=1777"
        return tmpfs

    def remove(self, container: Container | str) -> None:
        """Kill and remove a container; absent is fine."""
        try:
            obj = container if isinstance(container, Container) else self.client.containers.get(self.named(container))
            obj.remove(force=True)
        except NotFound:
            pass
        except APIError as exc:
            if "removal of container" in str(exc) and "already in progress" in str(exc):
                return
            raise SandboxError(f"cannot remove container: {exc}") from None

    def create_overlay_volume(self, name: str, lower: list[str], upper: str, work: str,
                              labels: dict[str, str]) -> None:
        """A local-driver volume of type overlay; mounting it copies nothing."""
        lower, upper, work = [self.paths.to_host(p) for p in lower], self.paths.to_host(upper), self.paths.to_host(work)
        options = ",".join([f"lowerdir={':'.join(lower)}", f"upperdir={upper}", f"workdir={work}",
                            # userxattr keeps overlay metadata in user.* xattrs and redirect_dir off, so
                            # the upper dir describes itself; metacopy/index off for the same reason.
                            "userxattr", "metacopy=off", "index=off"])
        try:
            self.client.volumes.create(
                name=self.named(name), driver="local",
                driver_opts={"type": "overlay", "device": "overlay", "o": options},
                labels={**self._own, **labels},
            )
        except APIError as exc:
            raise SandboxError(f"cannot create overlay volume {self.named(name)}: {exc}") from None

    def remove_volume(self, name: str) -> None:
        """Remove one of our volumes by the name we gave it (``named`` adds the instance); absent is fine."""
        try:
            self._remove_volume_object(self.client.volumes.get(self.named(name)))
        except NotFound:
            pass

    def _remove_volume_object(self, volume) -> None:
        # Objects listed from the engine already carry their real name: translating it again would miss.
        try:
            volume.remove(force=True)
        except NotFound:
            pass
        except APIError as exc:
            if "active mounts" in str(exc) and not self.client.containers.list(all=True, filters={"volume": volume.name}):
                # An engine restarted with live-restore never forgets the mount of a container it restored
                # (Docker 20.10): no container uses the volume, its mount is gone, only the engine's count is
                # stale. It is left; the sweep after the engine's next restart removes it.
                log.warning("volume kept by the engine's stale mount count", extra={"volume": volume.name})
                return
            raise SandboxError(f"cannot remove volume {volume.name}: {exc}") from None

    def _filters(self, job_id: str | None) -> dict:
        labels = [f"{LABEL}=1", f"{LABEL_INSTANCE}={self.instance}"]
        return {"label": labels + ([f"{LABEL_JOB}={job_id}"] if job_id else [])}

    def containers(self, job_id: str | None = None, all: bool = True) -> list[Container]:
        return self.client.containers.list(all=all, filters=self._filters(job_id), ignore_removed=True)

    def volumes(self, job_id: str | None = None) -> list:
        """Our volumes (of one job): labelled as ours, or named as ours but left without labels by a fault."""
        labelled = self.client.volumes.list(filters=self._filters(job_id))
        prefix = self.named(f"executor-{job_id}-a" if job_id else "executor-")
        unlabelled = [v for v in self.client.volumes.list(filters={"name": prefix})
                      if v.name.startswith(prefix) and not (v.attrs.get("Labels") or {}).get(LABEL)
                      and (job_id is None or self.job_of(v.name) == job_id)]
        return labelled + unlabelled

    def job_of(self, volume_name: str) -> str | None:
        """The job a volume of ours is named for (``executor-<instance>-<job>-a<attempt>[-<view>]``)."""
        match = _VOLUME_NAME.match(volume_name.removeprefix(f"executor-{self.instance}-"))
        return match.group("job") if match and volume_name.startswith(f"executor-{self.instance}-") else None

    def remove_job_objects(self, job_id: str) -> None:
        """Every container, then every volume, of one job (containers first: they hold the mounts)."""
        for container in self.containers(job_id):
            self.remove(container)
        for volume in self.volumes(job_id):
            self._remove_volume_object(volume)

    def sweep(self, live_jobs: Iterable[str]) -> list[str]:
        """Remove containers and volumes of ours that no live job owns; returns their names."""
        live = set(live_jobs)
        removed = []
        for container in self.containers():
            if container.labels.get(LABEL_JOB) not in live:
                self.remove(container)
                removed.append(container.name)
        for volume in self.volumes():
            if ((volume.attrs.get("Labels") or {}).get(LABEL_JOB) or self.job_of(volume.name)) not in live:
                self._remove_volume_object(volume)
                removed.append(volume.name)
        return removed


#: A volume's name after ``executor-<instance>-``: the job id (greedy: ids may hold "-a1"), the attempt, a view.
_VOLUME_NAME = re.compile(r"^(?P<job>.+)-a(?P<attempt>\d+)(?:-(?:home|test|before|tests))?$")
