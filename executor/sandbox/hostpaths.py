"""Host paths: where the engine finds what the executor sees, when the executor itself runs in a container.

Owns finding this process's own container (``own_container_id``), reading its bind mounts from the engine,
and translating paths both ways: a path the executor uses (the state root at ``/var/lib/executor``, the
workspaces at ``/srv/workspaces``) to the host path the engine must be given for an overlay's lower, upper
and work dirs or a bind mount (``to_host``), and a host path a person wrote in a job file to the path the
executor sees (``to_container``). Outside a container both are the identity. So "host path == container
path" is not the person's problem.

Must never: guess: a path not under a bind mount is given to the engine unchanged (and ``doctor`` says so).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from docker.errors import DockerException, NotFound

_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def own_container_id(proc: Path = Path("/proc/self")) -> str | None:
    """The id of the container this process runs in, or None on the host.

    The engine bind-mounts ``/var/lib/docker/containers/<id>/{hostname,hosts,resolv.conf}`` into every
    container, so mountinfo names the id whatever the cgroup version or network mode (with network host
    the hostname is the host's, so it cannot tell). cgroup v1 paths (``/docker/<id>``) are the fallback.
    """
    try:
        for line in (proc / "mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and "/containers/" in fields[3]:
                match = _CONTAINER_ID.search(fields[3])
                if match:
                    return match.group(0)
    except OSError:
        pass
    try:
        for line in (proc / "cgroup").read_text().splitlines():
            match = re.search(r"(?:docker[-/])([0-9a-f]{64})", line)
            if match:
                return match.group(1)
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class HostPaths:
    """Bind mounts of the executor's own container, as (path inside, path on the host), longest first."""

    binds: tuple[tuple[str, str], ...] = ()
    container: str | None = None  # the executor's own container id, when it runs in one
    notes: list[str] = field(default_factory=list, compare=False)
    problem: str | None = field(default=None, compare=False)  # why our own mounts could not be learned

    @classmethod
    def from_mounts(cls, mounts: Iterable[Mapping[str, Any]], container: str | None = None) -> HostPaths:
        binds = [(m["Destination"], m["Source"]) for m in mounts
                 if m.get("Type") == "bind" and m.get("Destination") and m.get("Source")]
        return cls(tuple(sorted(binds, key=lambda b: -len(b[0]))), container)

    @classmethod
    def discover(cls, client: Any, proc: Path = Path("/proc/self")) -> HostPaths:
        """Ask the engine for this process's own container's mounts (none outside a container)."""
        container = own_container_id(proc)
        if container is None:
            return cls()
        try:
            mounts = client.api.inspect_container(container).get("Mounts") or []
        except NotFound:
            return cls(notes=[f"container {container[:12]} is not one of this engine's: it sees our paths"])
        except DockerException as exc:
            return cls(problem=f"cannot inspect our own container {container[:12]}: {exc}")
        return cls.from_mounts(mounts, container)

    def to_host(self, path: str) -> str:
        """The host path the engine must be given for ``path`` as this process sees it."""
        return _swap(path, self.binds)

    def to_container(self, path: str) -> str:
        """The path this process sees for the host path ``path`` (a job file written on the host)."""
        return _swap(path, tuple(sorted(((h, c) for c, h in self.binds), key=lambda b: -len(b[0]))))

    def unmounted(self, wanted: list[tuple[str, Path]]) -> list[str]:
        """The named paths that live only inside this container (not under a bind mount): the engine, which
        resolves overlay paths on the host, cannot reach them."""
        problems = []
        for what, path in wanted:
            target = PurePosixPath(str(path))
            if not any(PurePosixPath(inside) == target or PurePosixPath(inside) in target.parents
                       for inside, _ in self.binds):
                problems.append(f"{what} {path} is not mounted from the host (it lives only inside this container)")
        return problems

    def describe(self) -> list[str]:
        """What was found, for ``doctor``."""
        if self.container is None:
            return ([self.problem] if self.problem else []) + self.notes or \
                ["not in a container: the engine sees the executor's own paths"]
        lines = [f"in container {self.container[:12]}"]
        lines += [f"{inside} is host path {host}" for inside, host in self.binds if inside != host] or \
            ["every bind mount is at its host path"]
        return lines


def _swap(path: str, pairs: tuple[tuple[str, str], ...]) -> str:
    target = PurePosixPath(path)
    for old, new in pairs:
        base = PurePosixPath(old)
        if target == base or base in target.parents:
            return str(PurePosixPath(new) / target.relative_to(base))
    return path
