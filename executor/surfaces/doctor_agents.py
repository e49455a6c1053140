"""``executor doctor``'s checks of the runners and their agents: every runner's credential variable is set, the
small models that write briefs are pinned ids, and each configured runner's agent CLI is in the sandbox image.

Owns those checks' wording and the probe that asks the image (one throwaway container, network none, as a
regular user, labelled and removed) which agent CLIs it holds and at which version.

Must never: print a credential's value (only the variable's name), or leave its probe container behind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import docker
from docker.errors import DockerException

from ..agent.registry import agent_for
from ..policy import Runner
from ..settings import COMPACTION_MODEL, Settings

PINNED_MODEL = re.compile(r"^[a-z0-9][a-z0-9.-]*-\d{8}$")  # e.g. claude-haiku-4-5-20251001


@dataclass(frozen=True)
class Finding:
    """What a check found: ``status`` ok | problem, the detail, and the fix (for a problem)."""

    status: str
    detail: str
    fix: str | None = None


def tokens(runners: dict[str, Runner], environ: Mapping[str, str], policies: object) -> Finding:
    if not runners:
        return Finding("problem", f"no runner in {policies}/runners.toml", "add a [runners.NAME] table with model "
                                                                            "and auth_env")
    missing = sorted({r.auth_env for r in runners.values() if not environ.get(r.auth_env)})
    if missing:
        users = {var: sorted(n for n, r in runners.items() if r.auth_env == var) for var in missing}
        return Finding("problem", "not set: " + ", ".join(f"{var} (runner {', '.join(users[var])})" for var in missing),
                       f"set {', '.join(missing)} in the executor's environment (with compose: in .env, which "
                       f"compose.yaml passes to the container); the jobs' API gateways and the compaction model "
                       f"use them")
    return Finding("ok", ", ".join(sorted({r.auth_env for r in runners.values()})) + " set")


def compaction_models(settings: Settings, runners: dict[str, Runner]) -> Finding:
    """EXECUTOR_COMPACTION_MODEL (Claude Code runners that name none) is pinned; each runner's own is named."""
    model = settings.compaction_model
    if not PINNED_MODEL.match(model):
        return Finding("problem", f"EXECUTOR_COMPACTION_MODEL is {model!r}, not a pinned (dated) model id: an alias "
                                  "moves to another model with a release, and no model but the one named may answer",
                       f"set EXECUTOR_COMPACTION_MODEL to a dated id, e.g. {COMPACTION_MODEL}")
    own = [f"{name}: {r.compaction_model}" for name, r in sorted(runners.items()) if r.compaction_model]
    none = sorted(name for name, r in runners.items() if agent_for(r).compaction_model(settings, r) is None)
    detail = f"{model}, called through each job's runner (its base_url and credential)"
    if own:
        detail += "; runners' own: " + ", ".join(own)
    if none:
        detail += f"; runners {', '.join(none)} name none: their follow-up jobs get the structural brief"
    return Finding("ok", detail)


#: One line per CLI: ``NAME VERSION`` or ``NAME missing``; a CLI that prints nothing is missing too.
_PROBE = ('for c in "$@"; do v=$(HOME=/tmp "$c" --version 2>/dev/null | head -n 1); '
          'if [ -n "$v" ]; then echo "$c $v"; else echo "$c missing"; fi; done')


def clis(client: docker.DockerClient, image: str, runners: dict[str, Runner], labels: dict[str, str]) -> Finding:
    """Each configured runner's agent CLI answers ``--version`` in ``image``."""
    needed = sorted({agent_for(r).cli for r in runners.values()})
    if not needed:
        return Finding("ok", "no runner configured")
    try:
        out = client.containers.run(image, ["sh", "-c", _PROBE, "probe", *needed], remove=True, network_mode="none",
                                    user="1000:1000", labels=labels, entrypoint=[]).decode("utf-8", "replace")
    except DockerException as exc:
        return Finding("problem", f"cannot run the image to look for the agent CLIs ({', '.join(needed)}): {exc}",
                       "check the engine's log")
    found = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    missing = [c for c in needed if found.get(c, "missing") == "missing"]
    users = {c: sorted(n for n, r in runners.items() if agent_for(r).cli == c) for c in missing}
    if missing:
        return Finding("problem", "agent CLIs missing from the image: " + ", ".join(
            f"{c} (runner {', '.join(users[c])})" for c in missing), "rebuild the image from this checkout")
    return Finding("ok", "agent CLIs: " + ", ".join(f"{c} {found[c]}" for c in needed))
