"""``executor doctor``'s runtime check: which OCI runtimes the engine offers against the ones this executor's
policies and ``EXECUTOR_DEFAULT_RUNTIME`` ask for, and how to register gVisor's ``runsc``.

Must never: change the engine's configuration (it only says what to write and how to reload).
"""

from __future__ import annotations

import docker
from docker.errors import DockerException

from ..errors import ConfigError
from ..policy import load_policy
from ..sandbox.deployment import runtime_hint
from ..settings import Settings


def runtime_findings(client: docker.DockerClient, settings: Settings) -> tuple[str, str, str | None]:
    """``(status, detail, fix)`` of the check."""
    try:
        offered = sorted(client.info().get("Runtimes") or {})
    except DockerException as exc:
        return "problem", f"cannot ask the engine: {exc}", "check the engine's log"
    return judge(offered, wanted_runtimes(settings))


def wanted_runtimes(settings: Settings) -> dict[str, list[str]]:
    """Runtime -> who asks for it: the default setting, and policies by name."""
    wanted: dict[str, list[str]] = {settings.default_runtime: ["EXECUTOR_DEFAULT_RUNTIME"]}
    for path in sorted(settings.policies.glob("*.toml")):
        if path.stem == "runners":
            continue
        try:
            runtime = load_policy(settings.policies, path.stem).runtime
        except ConfigError:
            continue  # the policy check names the broken file
        if runtime is not None:
            wanted.setdefault(runtime, []).append(f"policy {path.stem}")
    return wanted


def judge(offered: list[str], wanted: dict[str, list[str]]) -> tuple[str, str, str | None]:
    detail = f"the engine offers {', '.join(offered) or 'none'}"
    missing = sorted((runtime, who) for runtime, who in wanted.items() if runtime not in offered)
    if missing:
        runtime, who = missing[0]
        return ("problem", f"{detail}; {runtime} is asked for by {', '.join(who)} and is missing: those jobs "
                           "fail to start", runtime_hint(runtime))
    used = "; in use: " + ", ".join(f"{runtime} ({', '.join(who)})" for runtime, who in sorted(wanted.items()))
    if "runsc" not in offered:
        return ("ok", f"{detail}{used}; runsc (gVisor: a kernel of its own per job) is not registered",
                runtime_hint("runsc"))
    return "ok", detail + used, None
