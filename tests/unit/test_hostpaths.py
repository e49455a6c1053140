"""How the executor learns the host paths of its own mounts, and what ``doctor`` says when it cannot."""

from __future__ import annotations

from pathlib import Path

from docker.errors import APIError, NotFound

from executor.sandbox.hostpaths import HostPaths
from executor.settings import Settings
from executor.surfaces import doctor as doctor_mod

CONTAINER = "ab" * 32


class Engine:
    """Answers ``inspect_container`` with mounts, or raises what it is given."""

    def __init__(self, mounts: list | None = None, error: Exception | None = None) -> None:
        self.api = self
        self.mounts, self.error = mounts or [], error

    def inspect_container(self, container: str) -> dict:
        if self.error is not None:
            raise self.error
        assert container == CONTAINER
        return {"Mounts": self.mounts}


def in_container(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        f"612 600 8:1 /var/lib/docker/containers/{CONTAINER}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n")
    return proc


def test_mounts_are_translated_both_ways(tmp_path):
    paths = HostPaths.discover(Engine([{"Type": "bind", "Destination": "/srv/state", "Source": "/home/me/state"},
                                       {"Type": "volume", "Destination": "/data", "Source": "/var/lib/x"}]),
                               in_container(tmp_path))
    assert paths.container == CONTAINER and paths.problem is None
    assert paths.to_host("/srv/state/jobs/a") == "/home/me/state/jobs/a"
    assert paths.to_container("/home/me/state/spool") == "/srv/state/spool"
    assert paths.to_host("/data/x") == "/data/x"  # only bind mounts have a host path to give


def test_a_container_the_engine_does_not_know_is_a_note_and_one_it_cannot_inspect_a_problem(tmp_path):
    proc = in_container(tmp_path)
    other_engine = HostPaths.discover(Engine(error=NotFound("no such container")), proc)
    assert other_engine.problem is None and "not one of this engine's" in other_engine.notes[0]
    refused = HostPaths.discover(Engine(error=APIError("permission denied")), proc)
    assert refused.problem is not None and "cannot inspect our own container" in refused.problem
    assert refused.describe()[0] == refused.problem


def test_doctor_reports_own_mounts_it_could_not_learn_as_a_problem(tmp_path, monkeypatch):
    settings = Settings(home=tmp_path / "home", policies=tmp_path / "policies", workspace_roots=[tmp_path])
    doc = doctor_mod.Doctor(settings, {})
    monkeypatch.setattr(doctor_mod.HostPaths, "discover",
                        classmethod(lambda cls, client: HostPaths(problem="cannot inspect our own container x")))
    check = doc.check_paths()
    assert check.status == "problem" and "cannot inspect our own container" in check.detail
    monkeypatch.setattr(doctor_mod.HostPaths, "discover", classmethod(lambda cls, client: HostPaths()))
    assert doc.check_paths().status == "ok"
    monkeypatch.setattr(doctor_mod.HostPaths, "discover", classmethod(
        lambda cls, client: HostPaths(binds=(("/srv/state", "/home/me/state"),), container=CONTAINER)))
    unmounted = doc.check_paths()
    assert unmounted.status == "problem" and "is not mounted from the host" in unmounted.detail
