"""``executor doctor``: the checks of what commonly goes wrong on a new server, each with how to fix it.

Owns the read-mostly probes a person runs before (or instead of) reading a stack trace: the engine is
reachable, the sandbox image exists, an overlay volume with ``userxattr`` mounts, the state root is
writable, the store (``EXECUTOR_DATABASE_URL``) is reachable with a schema this executor knows, host paths equal container paths (when the executor runs in a container: the engine mounts the
overlays by *host* path), the runners' token variables are set, and the workspace roots exist and belong
to a regular user. Every check returns a ``Check``: ok or a problem, what was found, and how to fix it.

Must never: change anything outside ``$EXECUTOR_HOME/.doctor-*`` and its own labelled probe container and
volume (all removed before it returns), or print a credential's value (only the variable's name).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import docker
from docker.errors import DockerException, ImageNotFound, NotFound

from ..errors import ConfigError, SandboxError
from ..policy import load_runners
from ..sandbox.deployment import LABEL, LABEL_INSTANCE, LABEL_ROLE, Sandbox, instance_id
from ..settings import Settings
from ..transaction.safefs import remove_tree

PROBE_UID = 1000  # the probe's files belong to a regular user, like a repository's
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@dataclass
class Check:
    name: str
    status: str  # "ok" | "problem" | "skipped" (skipped: an earlier check it needs failed)
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, "problem", detail, fix)


def _skipped(name: str, needs: str) -> Check:
    return Check(name, "skipped", f"not checked: {needs} failed", f"fix {needs} first")


# -- running in a container --------------------------------------------------------------------------


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


def path_mismatches(mounts: list[Mapping[str, Any]], paths: list[tuple[str, Path]]) -> list[str]:
    """For each named path, why the engine would not find it at the same path on the host (or nothing).

    ``mounts`` is ``docker inspect``'s ``Mounts`` list of our own container; ``paths`` are (what, path). A path is covered by the
    mount whose destination is the path itself or its nearest ancestor; it is right when that mount is a
    bind whose source equals its destination (then every path below it is the same on both sides).
    """
    problems = []
    for what, path in paths:
        target = PurePosixPath(str(path))
        best: Mapping[str, Any] | None = None
        for mount in mounts:
            dest = PurePosixPath(mount.get("Destination", ""))
            if (dest == target or dest in target.parents) and (
                    best is None or len(str(dest)) > len(best.get("Destination", ""))):
                best = mount
        if best is None:
            problems.append(f"{what} {path} is not mounted from the host (it lives only inside this container)")
        elif best.get("Type") != "bind":
            problems.append(f"{what} {path} is on a {best.get('Type')} mount ({best.get('Name') or best.get('Source')}), "
                            f"not a bind mount of the same host path")
        elif best.get("Source") != best.get("Destination"):
            problems.append(f"{what} {path} is mounted from host path {best.get('Source')} at "
                            f"{best.get('Destination')}: the paths differ")
    return problems


# -- the checks -------------------------------------------------------------------------------------


class Doctor:
    def __init__(self, settings: Settings, environ: Mapping[str, str],
                 connect: Callable[[], docker.DockerClient] | None = None) -> None:
        self.settings = settings
        self.environ = environ
        self._connect = connect or (lambda: docker.from_env(timeout=60))
        self.client: docker.DockerClient | None = None

    def run(self) -> list[Check]:
        return list(self._checks())

    def _checks(self) -> Iterator[Check]:
        engine = self.check_engine()
        yield engine
        image = self.check_image() if not engine.failed else _skipped("sandbox image", "engine")
        yield image
        state = self.check_state_root()
        yield state
        yield self.check_store()
        paths = self.check_paths() if not engine.failed else _skipped("host path == container path", "engine")
        yield paths
        failed = [c.name for c in (engine, image, state, paths) if c.failed]
        yield _skipped("overlay (userxattr)", failed[0]) if failed else self.check_overlay()
        yield self.check_tokens()
        yield from self.check_workspace_roots()

    def check_engine(self) -> Check:
        name = "engine"
        try:
            self.client = self._connect()
            self.client.ping()
            version = self.client.version()
        except DockerException as exc:
            self.client = None
            host = self.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            return _problem(name, f"cannot reach the Docker engine at {host}: {exc}",
                            "start it (`systemctl start docker`) or set DOCKER_HOST; in compose, mount "
                            "/var/run/docker.sock into the executor container")
        return _ok(name, f"Docker {version.get('Version')} (API {version.get('ApiVersion')}) reachable")

    def check_image(self) -> Check:
        name = "sandbox image"
        image = self.settings.sandbox_image
        try:
            found = self.client.images.get(image)
        except ImageNotFound:
            return _problem(name, f"sandbox image {image!r} is missing",
                            f"build it: `docker compose build sandbox`, or `docker build --network host "
                            f"-t {image} sandbox/`; or set EXECUTOR_SANDBOX_IMAGE to an image that exists")
        except DockerException as exc:
            return _problem(name, f"cannot look up {image!r}: {exc}", "check the engine's log")
        return _ok(name, f"{image} present ({found.short_id})")

    def check_store(self) -> Check:
        """The store is reachable and its schema is one this executor knows (or it does not exist yet)."""
        from sqlalchemy.exc import SQLAlchemyError

        from ..store import schema
        from ..store.engine import make_engine, shown

        name, url = "store", self.settings.db_url
        if self.settings.database_url is None and not self.settings.db_path.exists():
            return _ok(name, f"{shown(url)}: no database yet (made at the first start)")
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                revision = schema.current(conn)
        except SQLAlchemyError as exc:
            return _problem(name, f"cannot reach the store {shown(url)}: {getattr(exc, 'orig', exc)}",
                            "check EXECUTOR_DATABASE_URL (host, port, user, password, database) and that "
                            "PostgreSQL runs and lets this host in (listen_addresses, pg_hba.conf)")
        finally:
            engine.dispose()
        if revision not in (None, schema.HEAD) and revision not in schema.known_revisions():
            return _problem(name, f"{shown(url)}: schema {revision} is newer than this executor ({schema.HEAD})",
                            "run the same executor version on every host that shares the store")
        return _ok(name, f"{shown(url)}: schema {revision or 'not made yet'} (this executor: {schema.HEAD}; "
                         "older ones are upgraded at start)")

    def check_state_root(self) -> Check:
        name = "state root"
        home = self.settings.home
        probe = home / f".doctor-write-{secrets.token_hex(4)}"
        try:
            home.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok\n")
            probe.unlink()
        except OSError as exc:
            return _problem(name, f"EXECUTOR_HOME {home} is not writable: {exc.strerror or exc}",
                            f"make {home} a writable directory for the executor (root): `mkdir -p {home}`; "
                            f"check no part of the path is a file and the mount is not read-only")
        if not home.is_absolute():
            return _problem(name, f"EXECUTOR_HOME {home} is not absolute", "set EXECUTOR_HOME to an absolute path")
        return _ok(name, f"{home} writable")

    def check_paths(self) -> Check:
        name = "host path == container path"
        roots = [("EXECUTOR_HOME", self.settings.home)]
        roots += [("workspace root", root) for root in self.settings.workspace_roots]
        container_id = own_container_id()
        if container_id is None:
            where = "in a container of another runtime, beside the engine" if Path("/.dockerenv").exists() else "on the host"
            return _ok(name, f"not in a container of this engine ({where}): the engine sees the same paths")
        try:
            mounts = self.client.api.inspect_container(container_id).get("Mounts") or []
        except NotFound:
            return _ok(name, f"this process's container {container_id[:12]} is not one of this engine's: "
                             f"the engine runs beside it and sees the same paths")
        except DockerException as exc:
            return _problem(name, f"cannot inspect this container ({container_id[:12]}): {exc}",
                            "check the engine's log")
        problems = path_mismatches(mounts, roots)
        if problems:
            return _problem(name, "; ".join(problems),
                            "the engine mounts each job's overlay by host path: mount the state root and every "
                            "workspace root at the same absolute path inside and outside (compose.yaml does: "
                            "`${EXECUTOR_HOME}:${EXECUTOR_HOME}`), and give the executor those paths")
        return _ok(name, f"in container {container_id[:12]}: {', '.join(str(p) for _, p in roots)} "
                         f"mounted at their host paths")

    def check_overlay(self) -> Check:
        """Build the smallest job workspace there is and run the sandbox image on it."""
        name = "overlay (userxattr)"
        sandbox = Sandbox(self.client, self.settings.sandbox_image, instance_id(self.settings.home))
        tag = secrets.token_hex(4)
        root = self.settings.home / f".doctor-{tag}"
        volume = f"executor-doctor-{tag}"
        container = None
        try:
            lower, upper, work = root / "lower", root / "upper", root / "work"
            for d in (lower, upper, work):
                d.mkdir(parents=True)
                os.chown(d, PROBE_UID, PROBE_UID)
            (lower / "probe").write_text("lower\n")
            os.chown(lower / "probe", PROBE_UID, PROBE_UID)
            labels = {LABEL_ROLE: "doctor", "io.executor.doctor": tag}
            sandbox.create_overlay_volume(volume, [str(lower)], str(upper), str(work), labels)
            container = self.client.containers.create(
                self.settings.sandbox_image, ["sh", "-c", "test -f /workspace/probe && echo upper > /workspace/written"],
                user=f"{PROBE_UID}:{PROBE_UID}", network_mode="none",
                cap_drop=["ALL"], security_opt=["no-new-privileges"],
                labels={LABEL: "1", LABEL_INSTANCE: sandbox.instance, **labels},
                mounts=[docker.types.Mount(target="/workspace", source=volume, type="volume", no_copy=True)],
            )
            container.start()
            code = container.wait(timeout=60).get("StatusCode")
            output = container.logs().decode(errors="replace").strip()
            if code != 0:
                return _problem(name, f"the probe container exited {code} on the overlay: {output[-300:]}",
                                "the state root must be on a filesystem with user xattrs (ext4, xfs, btrfs)")
            if not (upper / "written").is_file() or (lower / "written").exists():
                return _problem(name, "the probe's write did not land in the upper dir",
                                "the state root must not itself be on overlayfs; use a plain ext4/xfs directory")
        except (SandboxError, DockerException, OSError) as exc:
            message = str(exc)
            return _problem(name, f"an overlay volume with userxattr under {self.settings.home} cannot be used: "
                                  f"{message[-400:]}",
                            f"overlay's userxattr needs Linux >= 5.11 (this kernel: {os.uname().release}) and "
                            f"a state root on ext4/xfs/btrfs (not overlay, NFS or tmpfs)")
        finally:
            self._clean_probe(sandbox, container, volume, root)
        return _ok(name, f"an overlay volume with userxattr mounts under {self.settings.home}")

    @staticmethod
    def _clean_probe(sandbox: Sandbox, container, volume: str, root: Path) -> None:
        """Best effort: whatever of the probe exists goes (a failed start leaves a created container)."""
        try:
            if container is not None:
                sandbox.remove(container)
            sandbox.remove_volume(volume)
        except (SandboxError, DockerException):
            pass
        try:
            if root.exists():
                remove_tree(root)
        except OSError:
            pass

    def check_tokens(self) -> Check:
        name = "runner tokens"
        try:
            runners = load_runners(self.settings.policies)
        except ConfigError as exc:
            return _problem(name, f"cannot read the runners: {exc}",
                            f"put a valid runners.toml into EXECUTOR_POLICIES ({self.settings.policies})")
        if not runners:
            return _problem(name, f"no runner in {self.settings.policies / 'runners.toml'}",
                            "add a [runners.NAME] table with model and auth_env")
        missing = sorted({r.auth_env for r in runners.values() if not self.environ.get(r.auth_env)})
        if missing:
            users = {var: sorted(n for n, r in runners.items() if r.auth_env == var) for var in missing}
            return _problem(name, "not set: " + ", ".join(f"{var} (runner {', '.join(users[var])})" for var in missing),
                            f"set {', '.join(missing)} in the executor's environment (with compose: in .env, "
                            f"which compose.yaml passes to the container)")
        return _ok(name, ", ".join(sorted({r.auth_env for r in runners.values()})) + " set")

    def check_workspace_roots(self) -> Iterator[Check]:
        name = "workspace roots"
        roots = self.settings.workspace_roots
        if not roots:
            yield _problem(name, "EXECUTOR_WORKSPACE_ROOTS is empty: no workspace is allowed",
                           "set EXECUTOR_WORKSPACE_ROOTS to the directory (or ':'-separated directories) "
                           "holding the repositories")
            return
        for root in roots:
            try:
                st = root.stat()
            except OSError as exc:
                yield _problem(f"{name}: {root}", f"{root} does not exist ({exc.strerror})",
                               f"create it and give it to the repositories' owner: "
                               f"`mkdir -p {root} && chown USER: {root}`")
                continue
            if not root.is_dir():
                yield _problem(f"{name}: {root}", f"{root} is not a directory", "point it at a directory")
            elif st.st_uid == 0:
                yield _problem(f"{name}: {root}", f"{root} is owned by root; agents run as the repository "
                                                  f"owner and must never be root",
                               f"`chown USER: {root}` (and the repositories in it) to a regular user")
            else:
                yield _ok(f"{name}: {root}", f"exists, owned by uid {st.st_uid}")


def run(settings: Settings, environ: Mapping[str, str]) -> list[Check]:
    doctor = Doctor(settings, environ)
    try:
        return doctor.run()
    finally:
        if doctor.client is not None:
            doctor.client.close()


def render(checks: list[Check]) -> str:
    lines = []
    width = max(len(c.name) for c in checks)
    for check in checks:
        mark = {"ok": "ok", "problem": "PROBLEM", "skipped": "skipped"}[check.status]
        lines.append(f"{mark:8} {check.name:{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':8} {'':{width}}  fix: {check.fix}")
    bad = [c for c in checks if c.status == "problem"]
    lines.append(f"{len(bad)} problem(s)" if bad else f"all {len(checks)} checks passed on {socket.gethostname()}")
    return "\n".join(lines)


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
