"""The agent container's command around any CLI, and the credential a runner names.

Owns the wrapper that reports forks the pids limit refused (for every CLI: a fork bomb can take the CLI down
with it; this says why), putting a sealed job's command behind the forwarder, where the agent's own
configuration files are mounted (``CONFIG_MOUNT``), and reading a runner's credential from the executor's
environment by the name ``auth_env`` gives.

Must never: choose a model or runner other than the job's, put the real credential into a sealed job's
container, or read any environment variable but the one a runner names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import ConfigError
from ..policy import Runner
from ..sandbox.seal import forward_command

#: Where an attempt's agent configuration files (``Launch.files``) are mounted, read-only, in its container.
CONFIG_MOUNT = "/etc/executor-agent"

# After the CLI exits, report on stderr how many forks the pids limit refused (shell builtins only: at
# the limit nothing can be forked). A fork bomb can take the CLI down with it; this says why.
_PIDS_REPORT = ('"$@"; rc=$?; for f in /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events; do '
                '[ -r "$f" ] && while read -r k v; do [ "$k" = max ] && echo "executor-pids-refused $v" >&2; '
                'done < "$f"; done; exit $rc')
PIDS_LINE = re.compile(r"^executor-pids-refused (\d+)$", re.MULTILINE)


def container_command(argv: list[str], sealed: bool) -> list[str]:
    """The container's command: the CLI's ``argv`` in the pids report, behind the forwarder when sealed."""
    wrapped = ["sh", "-c", _PIDS_REPORT, "agent", *argv]
    return forward_command(wrapped) if sealed else wrapped


def refused_forks(stderr: str) -> int:
    """Forks the pids limit refused during the run, as the container reported when the CLI exited."""
    counts = [int(n) for n in PIDS_LINE.findall(stderr)]
    return max(counts, default=0)


def runner_credential(runner: Runner, secrets: Mapping[str, str]) -> str:
    """The runner's credential, from the executor's environment by the name ``auth_env`` gives."""
    token = secrets.get(runner.auth_env)
    if not token:
        raise ConfigError(
            f"runner {runner.name!r}: environment variable {runner.auth_env} is not set in the executor's "
            "environment; set it (its value is the runner's credential)"
        )
    return token
