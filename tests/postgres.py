"""A throwaway PostgreSQL 15 cluster for the tests: Debian's server binaries, a data directory in /tmp, a
loopback port, started with ``pg_ctl`` and stopped at the end of the session.

Why not testcontainers: there is no registry here (the image would have to be built first), and the
engine runs without a bridge network (containers use ``none`` or ``host``), so a container would only add
a build and a port-mapping workaround around the same binaries. ``pg_ctl`` starts a cluster in about a
second and needs no engine at all, so the store's tests run without Docker.

Durability is off (``fsync=off``): these tests prove logic, not what survives a power cut.
A missing server fails the tests that need it (never a skip): ``.ci/setup`` installs ``postgresql-15``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path(os.environ.get("EXECUTOR_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self, fast: bool = True) -> None:
        if not (BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 is not installed ({BIN}/initdb missing): apt-get install postgresql-15 "
                               "(.ci/setup does)")
        self.root = Path(tempfile.mkdtemp(prefix="executor-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.fast = fast
        self.user = "postgres"
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.started = False

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")

    def start(self) -> PostgresCluster:
        done = self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                         *(["--no-sync"] if self.fast else []))
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr}")
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}", "-c max_connections=300",
                   "-c shared_buffers=128MB"]
        if self.fast:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                         "-o", " ".join(options), "start")
        if done.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr} {log[-2000:]}")
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new database (empty, or a copy of ``template``); returns its URL."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""))
        return self.url(name)

    def migrated_database(self) -> str:
        """A new database whose schema is already at the code's head (a copy of one migrated template)."""
        if not getattr(self, "_template", None):
            from executor.store import Store

            url = self.create_database("executor_template")
            Store(url).close()
            self._template = "executor_template"
        return self.create_database(template=self._template)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def away(self, seconds: float) -> None:
        """The server down for ``seconds`` (a longer upgrade, a host reboot), then up again with the same data
        and port ("restart" keeps the options it was started with)."""
        import time

        done = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr}")
        time.sleep(seconds)
        self.restart()

    def restart(self) -> None:
        """A fast restart, as an upgrade of the server does: every session is cut, the server is away for a
        moment, then accepts connections again on the same port."""
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-m", "fast", "-w",
                         "-t", "60", "restart")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl restart failed: {done.stderr}")

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
