"""The unit tier is the fast one: no container engine, no database server, no network server. Each test here
runs with the engine's address pointing nowhere and with listening on an internet socket refused, so a test
that needs one of them fails here (it belongs in tests/integration) instead of quietly slowing the tier."""

from __future__ import annotations

import socket

import pytest

_listen = socket.socket.listen


def _refuse_listening(self: socket.socket, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise AssertionError("a unit test started a network server: move it to tests/integration")
    return _listen(self, *args)


@pytest.fixture(autouse=True)
def _no_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/unit-tier-has-no-engine.sock")
    monkeypatch.setattr(socket.socket, "listen", _refuse_listening)


@pytest.fixture
def postgres_cluster():
    raise AssertionError("a unit test asked for PostgreSQL: move it to tests/integration/postgres")
