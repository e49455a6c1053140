"""A fake ``Deployment`` (the engine boundary) for unit tests of scheduling and settling: it records what
it was asked to do and holds no container. Every behaviour these tests cover is also proven on the real
engine by the integration tier."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class FakeDeployment:
    calls: list[tuple] = field(default_factory=list)

    def check_image(self) -> None:
        self.calls.append(("check_image",))

    def image_id(self) -> str:
        return "sha256:fake"

    def start(self, spec):
        self.calls.append(("start", spec.name))
        raise AssertionError("a unit test must not start a container")

    def remove(self, container) -> None:
        self.calls.append(("remove", container))

    def create_overlay_volume(self, name: str, lower: list[str], upper: str, work: str, labels: dict) -> None:
        self.calls.append(("create_overlay_volume", name))

    def remove_volume(self, name: str) -> None:
        self.calls.append(("remove_volume", name))

    def containers(self, job_id: str | None = None, all: bool = True) -> list:
        return []

    def remove_job_objects(self, job_id: str) -> None:
        self.calls.append(("remove_job_objects", job_id))

    def sweep(self, live_jobs: Iterable[str]) -> list[str]:
        self.calls.append(("sweep", sorted(live_jobs)))
        return []
