"""A private Docker engine for the tests that restart it: a second ``dockerd`` with its own socket, data root,
exec root (where it starts its own containerd) and pid file, no bridge and no iptables rules, so restarting
it touches nothing of the shared engine or of other test runs.

The sandbox image is copied into it once (``docker save | docker load`` from the shared engine): the
session-scoped fixture pays that (about 20 s) once. ``restart()`` does what an ``apt upgrade`` of the engine
does: SIGTERM (containers stop, unless the engine runs with ``--live-restore``), then a new ``dockerd`` on the
same data root.

A missing ``dockerd`` fails the tests that need it (never a skip): the shared engine's package provides it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"


class PrivateEngine:
    def __init__(self, live_restore: bool = False) -> None:
        if not os.path.exists(DOCKERD):
            raise RuntimeError(f"dockerd is not installed ({DOCKERD} missing): apt-get install docker.io")
        # Short paths: containerd's socket path under the exec root must fit a unix socket's 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="xe-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.live_restore = live_restore
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [DOCKERD, "--host", self.host, "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
                *(["--live-restore"] if self.live_restore else [])]

    def client(self, timeout: int = 120):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=timeout)

    def start(self, timeout: float = 60.0) -> PrivateEngine:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            if self.answers():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout:g}s: {self.log.read_text()[-3000:]}")

    def answers(self) -> bool:
        try:
            client = self.client(timeout=5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure means it does not answer yet
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, as a service manager stops the engine; waits until the process is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def load_image(self, image: str, source_host: str | None = None) -> None:
        """Copy ``image`` from the shared engine (or ``source_host``) into this one."""
        source = ["docker"] + (["-H", source_host] if source_host else [])
        save = subprocess.Popen([*source, "save", image], stdout=subprocess.PIPE)
        done = subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=save.stdout, capture_output=True,
                              text=True, timeout=600, check=False)
        save.stdout.close()
        if save.wait(timeout=60) != 0 or done.returncode != 0:
            raise RuntimeError(f"could not load {image} into the private engine: {done.stderr}")

    def close(self) -> None:
        """Stop the engine, remove every container it holds first (no live-restored process outlives it), and
        remove its directories (its data root is a private mount of itself)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):  # best effort: the engine is going away
                client = self.client(timeout=30)
                for container in client.containers.list(all=True):
                    container.remove(force=True)
                client.close()
        live, self.live_restore = self.live_restore, False
        self.stop()
        self.live_restore = live
        for mount in sorted(self._mounts(), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def _mounts(self) -> list[str]:
        with open("/proc/self/mounts") as mounts:
            return [line.split()[1] for line in mounts if line.split()[1].startswith(str(self.root))]
