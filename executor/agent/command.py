"""The Claude Code CLI's command line and the environment its container gets.

Owns the flags every agent run uses (the runner's exact model, stream-json output with partial messages,
no permission prompts inside the sandbox, resume, the appended system prompt, the disallowed tools), the
wrapper that reports forks the pids limit refused (behind the forwarder, for a sealed job), and the
environment: for a sealed job a placeholder under the name the CLI expects and loopback endpoints; for an
unsealed one (an explicit opt-in) the runner's credential itself.

Must never: choose a model or runner other than the job's (there is no fallback anywhere), put the real
credential into a sealed job's container, or put a credential anywhere but the container's environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import ConfigError
from ..policy import Runner
from ..sandbox.deployment import AGENT_HOME
from ..sandbox.seal import PLACEHOLDER_CREDENTIAL, forward_command, sealed_environment

# After the CLI exits, report on stderr how many forks the pids limit refused (shell builtins only: at
# the limit nothing can be forked). A fork bomb can take the CLI down with it; this says why.
_PIDS_REPORT = ('"$@"; rc=$?; for f in /sys/fs/cgroup/pids/pids.events /sys/fs/cgroup/pids.events; do '
                '[ -r "$f" ] && while read -r k v; do [ "$k" = max ] && echo "executor-pids-refused $v" >&2; '
                'done < "$f"; done; exit $rc')
PIDS_LINE = re.compile(r"^executor-pids-refused (\d+)$", re.MULTILINE)


def agent_command(prompt: str, model: str, resume: str | None = None,
                  append_system_prompt: str | None = None, disallowed_tools: list[str] | None = None,
                  sealed: bool = False) -> list[str]:
    command = ["claude", "-p", prompt, "--model", model, "--output-format", "stream-json", "--verbose",
               "--include-partial-messages", "--dangerously-skip-permissions"]
    if resume:
        command += ["--resume", resume]
    if append_system_prompt:
        command += ["--append-system-prompt", append_system_prompt]
    if disallowed_tools:
        command += ["--disallowedTools", ",".join(disallowed_tools)]
    wrapped = ["sh", "-c", _PIDS_REPORT, "agent", *command]
    return forward_command(wrapped) if sealed else wrapped


def refused_forks(stderr: str) -> int:
    """Forks the pids limit refused during the run, as the container reported when the CLI exited."""
    counts = [int(n) for n in PIDS_LINE.findall(stderr)]
    return max(counts, default=0)


def agent_environment(runner: Runner, secrets: Mapping[str, str], max_retries: int = 2,
                      sealed: bool = False) -> dict[str, str]:
    """The container's environment. Sealed: a placeholder credential and the gateway's and proxy's loopback
    ports (the gateway holds the real credential). Unsealed: the runner's credential itself."""
    env = {
        "HOME": AGENT_HOME,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        # The CLI retries by itself up to 10 times; keep that low so the executor's recorded backoff,
        # which frees the slot, is the one in control.
        "CLAUDE_CODE_MAX_RETRIES": str(max_retries),
    }
    if sealed:
        return {**env, runner.container_auth_var: PLACEHOLDER_CREDENTIAL, **sealed_environment()}
    env[runner.container_auth_var] = runner_credential(runner, secrets)
    if runner.base_url:
        env["ANTHROPIC_BASE_URL"] = runner.base_url
    return env


def runner_credential(runner: Runner, secrets: Mapping[str, str]) -> str:
    """The runner's credential, from the executor's environment by the name ``auth_env`` gives."""
    token = secrets.get(runner.auth_env)
    if not token:
        raise ConfigError(
            f"runner {runner.name!r}: environment variable {runner.auth_env} is not set in the executor's "
            "environment; set it (its value is the runner's credential)"
        )
    return token
