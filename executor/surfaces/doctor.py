"""``executor doctor``: the checks of what commonly goes wrong on a new server, each with how to fix it.

Owns the read-mostly probes a person runs before (or instead of) reading a stack trace: the engine is
reachable, the sandbox image exists, the state root is writable, how a policy's ``disk`` holds here (a disk
image per job, or the watchdog's measurement, why, and how to get the stronger one), an overlay volume with
``userxattr`` mounts (on a job disk image where those are in force: the engine sees what the executor
mounts), the store (``EXECUTOR_DATABASE_URL``) is reachable with a schema this executor knows, host paths
equal container paths (when the executor runs in a container: the engine mounts the overlays by *host*
path), the runners' token variables are set (the sealed jobs' gateways and compaction use them), each
configured runner's agent CLI is in the image, the compaction model is a pinned id, every policy loads (one that leaves the sandbox unsealed, ``network``
bridge or host, is flagged), and the workspace roots exist and belong to a regular user. Every check
returns a ``Check``: ok, a warning (an explicit opt-in worth knowing about) or a problem, what was found,
and how to fix it.

Must never: change anything outside ``$EXECUTOR_HOME/.doctor-*`` and ``.disk-probe-*`` and its own labelled
probe container and volume (all removed, images unmounted, before it returns), or print a credential's value
(only the variable's name).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import docker
from docker.errors import DockerException

from ..errors import ConfigError, DiskImageError, SandboxError
from ..policy import load_policy, load_runners
from ..sandbox.deployment import (
    LABEL,
    LABEL_INSTANCE,
    LABEL_ROLE,
    SANDBOX_INTERFACE,
    Sandbox,
    image_problem,
    instance_id,
    rebuild_hint,
)
from ..sandbox.hostpaths import HostPaths, own_container_id
from ..settings import Settings
from ..transaction import jobdisk
from .doctor_runtimes import runtime_findings
from . import doctor_agents as agents

PROBE_UID = 1000  # the probe's files belong to a regular user, like a repository's


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warning" | "problem" | "skipped" (skipped: an earlier check it needs failed)
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _problem(name: str, detail: str, fix: str) -> Check:
    return Check(name, "problem", detail, fix)


def _warning(name: str, detail: str, fix: str) -> Check:
    return Check(name, "warning", detail, fix)


def _found(name: str, finding: agents.Finding) -> Check:
    return Check(name, finding.status, finding.detail, finding.fix)


def _skipped(name: str, needs: str) -> Check:
    return Check(name, "skipped", f"not checked: {needs} failed", f"fix {needs} first")


# -- running in a container --------------------------------------------------------------------------


# -- the checks -------------------------------------------------------------------------------------


class Doctor:
    def __init__(self, settings: Settings, environ: Mapping[str, str],
                 connect: Callable[[], docker.DockerClient] | None = None) -> None:
        self.settings = settings
        self.environ = environ
        self._connect = connect or (lambda: docker.from_env(timeout=60))
        self.client: docker.DockerClient | None = None
        self.disk: jobdisk.Enforcement | None = None  # what ``check_disk_cap`` found

    def run(self) -> list[Check]:
        return list(self._checks())

    def _checks(self) -> Iterator[Check]:
        engine = self.check_engine()
        yield engine
        image = self.check_image() if not engine.failed else _skipped("sandbox image", "engine")
        yield image
        yield self.check_runtimes() if not engine.failed else _skipped("runtimes", "engine")
        state = self.check_state_root()
        yield state
        disk = self.check_disk_cap() if not state.failed else _skipped("disk cap", "state root")
        yield disk
        yield self.check_store()
        paths = self.check_paths() if not engine.failed else _skipped("host path == container path", "engine")
        yield paths
        failed = [c.name for c in (engine, image, state, paths) if c.failed]
        failed += [disk.name] if disk.status == "problem" else []
        yield _skipped("overlay (userxattr)", failed[0]) if failed else self.check_overlay()
        yield self.check_tokens()
        yield self.check_compaction_model()
        yield from self.check_policies()
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
            problem = image_problem(self.client, image)
            found = None if problem else self.client.images.get(image)
        except DockerException as exc:
            return _problem(name, f"cannot look up {image!r}: {exc}", "check the engine's log")
        if problem is not None:
            return _problem(name, problem, f"{rebuild_hint(image)}; or set EXECUTOR_SANDBOX_IMAGE to an image "
                                           "built from this checkout")
        clis = agents.clis(self.client, image, self._runners() or {},
                           {LABEL: "1", LABEL_INSTANCE: instance_id(self.settings.home), LABEL_ROLE: "doctor"})
        if clis.status != "ok":
            return _problem(name, clis.detail, f"{rebuild_hint(image)}")
        return _ok(name, f"{image} present ({found.short_id}, interface {SANDBOX_INTERFACE}); {clis.detail}")

    def check_runtimes(self) -> Check:
        return Check("runtimes", *runtime_findings(self.client, self.settings))

    def check_store(self) -> Check:
        """The store is reachable and its schema is one this executor knows (or it does not exist yet)."""
        from sqlalchemy.exc import SQLAlchemyError

        from ..store import schema
        from ..store.engine import make_engine, shown

        name, url = "store", self.settings.db_url
        if not self.settings.store_exists:
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
        found = (f"{shown(url)}: schema {revision or 'not made yet'} (this executor: {schema.HEAD}; older ones are "
                 "upgraded at start)")
        from .cli_db import HISTORY_FIX, history_left_behind

        left = history_left_behind(self.settings)
        if left:
            return _warning(name, f"{found}; it holds no job while the SQLite store {self.settings.db_path} holds "
                                  f"{left}: switching to it started an empty history", HISTORY_FIX)
        return _ok(name, found)

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
        name = "host paths"
        wanted = [("EXECUTOR_HOME", self.settings.home)]
        wanted += [("workspace root", root) for root in self.settings.workspace_roots]
        paths = HostPaths.discover(self.client)
        if paths.problem is not None:  # paths would reach the engine untranslated
            return _problem(name, paths.problem,
                            "let the executor inspect its own container (mount the engine's socket it runs on); "
                            "job overlays are given to the engine by host path")
        if paths.container is None:
            return _ok(name, "; ".join(paths.describe()))
        problems = paths.unmounted(wanted)
        if problems:
            return _problem(name, "; ".join(problems),
                            "the engine mounts each job's overlay from the host: bind-mount the state root and "
                            "every workspace root from the host (compose.yaml does)")
        found = [f"{what} {p} is host path {paths.to_host(str(p))}" for what, p in wanted]
        return _ok(name, f"in container {paths.container[:12]}: " + "; ".join(found))

    def check_disk_cap(self) -> Check:
        """How a policy's ``disk`` holds for jobs run here: a disk image per job (ok), or the watchdog (a
        warning: a fast writer overshoots, an open deleted file is not seen), with how to get images."""
        name = "disk cap"
        try:
            self.disk = jobdisk.decide(self.settings, in_container=own_container_id() is not None)
        except ConfigError as exc:
            return _problem(name, str(exc), jobdisk.STRONGER)
        if self.disk.images:
            return _ok(name, f"disk image per job: {self.disk.why}")
        return _warning(name, f"watchdog: {self.disk.why}", self.disk.fix or jobdisk.STRONGER)

    def check_overlay(self) -> Check:
        """Build the smallest job workspace there is (its layers on a disk image where jobs get one) and run
        the sandbox image on it."""
        name = "overlay (userxattr)"
        paths = HostPaths.discover(self.client)
        sandbox = Sandbox(self.client, self.settings.sandbox_image,
                          instance_id(Path(paths.to_host(str(self.settings.home)))), paths)
        tag = secrets.token_hex(4)
        root = self.settings.home / f".doctor-{tag}"
        volume = f"executor-doctor-{tag}"
        container = None
        images = self.disk is not None and self.disk.images
        try:
            jobdisk.prepare(root, jobdisk.MIN_IMAGE if images else None, keep=False)
            layers = root / jobdisk.LAYERS
            lower, upper, work = root / "lower", layers / "upper", layers / "work"
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
                mounts=[docker.types.Mount(target="/workspace", source=sandbox.named(volume), type="volume",
                                            no_copy=True)],
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
        except (SandboxError, DiskImageError, DockerException, OSError) as exc:
            message = str(exc)
            return _problem(name, f"an overlay volume with userxattr under {self.settings.home} cannot be used: "
                                  f"{message[-400:]}",
                            f"overlay's userxattr needs Linux >= 5.11 (this kernel: {os.uname().release}) and "
                            f"a state root on ext4/xfs/btrfs (not overlay, NFS or tmpfs)")
        finally:
            self._clean_probe(sandbox, container, volume, root)
        where = " with its upper dir on a job disk image" if images else ""
        return _ok(name, f"an overlay volume with userxattr mounts under {self.settings.home}{where}")

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
            jobdisk.remove(root)  # its image unmounted first
        except (DiskImageError, OSError):
            pass

    def _runners(self) -> dict | None:
        try:
            return load_runners(self.settings.policies)
        except ConfigError:
            return None

    def check_tokens(self) -> Check:
        name = "runner tokens"
        try:
            runners = load_runners(self.settings.policies)
        except ConfigError as exc:
            return _problem(name, f"cannot read the runners: {exc}",
                            f"put a valid runners.toml into EXECUTOR_POLICIES ({self.settings.policies})")
        return _found(name, agents.tokens(runners, self.environ, self.settings.policies))

    def check_compaction_model(self) -> Check:
        return _found("compaction model", agents.compaction_models(self.settings, self._runners() or {}))

    def check_policies(self) -> Iterator[Check]:
        """Every policy file loads; one that leaves the sandbox unsealed is flagged."""
        for path in sorted(self.settings.policies.glob("*.toml")):
            if path.stem == "runners":
                continue
            name = f"policy {path.stem}"
            try:
                policy = load_policy(self.settings.policies, path.stem)
            except ConfigError as exc:
                yield _problem(name, str(exc), "fix the file: jobs naming this policy are rejected at intake")
                continue
            if policy.unsealed:
                yield _warning(name, f"UNSEALED: network = {policy.network!r}: its jobs' containers hold the runner's "
                                     "real credential and have an open route out, unchecked and unrecorded",
                               'set network = "sealed" (and list what the jobs may reach in egress) unless the '
                               "opt-in is intended")
            else:
                egress = ", ".join(policy.egress) or "nothing"
                yield _ok(name, f"network {policy.network}" + (f"; egress: {egress}" if policy.sealed else ""))

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
        mark = {"ok": "ok", "warning": "WARNING", "problem": "PROBLEM", "skipped": "skipped"}[check.status]
        lines.append(f"{mark:8} {check.name:{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':8} {'':{width}}  fix: {check.fix}")
    bad = [c for c in checks if c.status == "problem"]
    warned = sum(1 for c in checks if c.status == "warning")
    lines.append(f"{len(bad)} problem(s)" if bad else f"all {len(checks)} checks passed on {socket.gethostname()}"
                 + (f" ({warned} warning(s))" if warned else ""))
    return "\n".join(lines)


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
