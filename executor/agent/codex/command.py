"""The Codex CLI's command line and the environment its container gets.

Owns the flags every run uses: ``codex exec --json`` with the runner's exact model, a provider of the
executor's own (``model_providers.executor``: the Responses API at the gateway for a sealed job, else at the
runner's ``base_url``; the credential from ``OPENAI_API_KEY``), the CLI's own retries bounded by the policy's
``cli_max_retries`` (request and stream retries; ``unbounded_connection_retries`` off, else an unreachable API
is retried forever), no approvals and no sandbox of its own inside the job's container, no git check, the
features a headless job does not use switched off (``Agent.disallowed_tools``: plugins and apps call other
hosts at start; request compression would be refused by the gateway), analytics and the update check off,
the executor's system prompt as ``developer_instructions``, and ``exec resume`` for a later job of a session.
Everything is given with ``-c`` on the command line: no configuration file, so nothing in the job's home
decides where the API is.

Must never: choose a model or runner other than the job's, put the real credential into a sealed job's
container, or put a credential anywhere but the container's environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ...policy import Runner
from ...sandbox.deployment import AGENT_HOME
from ...sandbox.seal import API_URL, sealed_environment
from ..launch import runner_credential
from .api import PUBLIC_API

#: What the container holds instead of the runner's credential (the gateway swaps in the real one).
PLACEHOLDER_CREDENTIAL = "sk-sealed-placeholder-not-a-credential"
KEY_VAR = "OPENAI_API_KEY"
PROVIDER = "executor"
#: Switched off whatever the policy says: the gateway refuses a compressed body, and a run must end when the
#: API cannot be reached (the executor's backoff is the one in control).
ALWAYS_OFF = ("enable_request_compression", "unbounded_connection_retries")


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def argv(prompt: str, model: str, base_url: str, max_retries: int, resume: str | None = None,
         system: str | None = None, disabled: list[str] | tuple[str, ...] = ()) -> list[str]:
    provider = f"model_providers.{PROVIDER}"
    command = ["codex", "exec"]
    if resume:
        command.append("resume")
    command += ["--json", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", "-m", model,
                "-c", f"model_provider={_toml(PROVIDER)}", "-c", f"{provider}.name={_toml(PROVIDER)}",
                "-c", f"{provider}.base_url={_toml(base_url)}", "-c", f"{provider}.env_key={_toml(KEY_VAR)}",
                "-c", f"{provider}.wire_api={_toml('responses')}",
                "-c", f"{provider}.request_max_retries={int(max_retries)}",
                "-c", f"{provider}.stream_max_retries={int(max_retries)}",
                "-c", "analytics.enabled=false", "-c", "check_for_update_on_startup=false",
                "-c", f"web_search={_toml('disabled')}"]
    for feature in dict.fromkeys([*ALWAYS_OFF, *disabled]):
        command += ["--disable", feature]
    if system:
        command += ["-c", f"developer_instructions={_toml(system)}"]
    if resume:
        command.append(resume)
    return [*command, "--", prompt]  # a prompt beginning with "-" is not an option


def base_url(runner: Runner, sealed: bool) -> str:
    """Where the CLI sends its API calls: the gateway for a sealed job, else the runner's endpoint."""
    return f"{API_URL}/v1" if sealed else (runner.base_url or PUBLIC_API)


def environment(runner: Runner, secrets: Mapping[str, str], sealed: bool = False) -> dict[str, str]:
    """The container's environment. Sealed: a placeholder credential and the proxy's loopback port (the gateway
    holds the real credential). Unsealed: the runner's credential itself."""
    # CODEX_HOME is left to its default, ~/.codex, which the CLI makes (it refuses a CODEX_HOME that does not exist)
    env = {"HOME": AGENT_HOME, "NO_COLOR": "1"}
    if sealed:
        return {**env, KEY_VAR: PLACEHOLDER_CREDENTIAL, **sealed_environment()}
    return {**env, KEY_VAR: runner_credential(runner, secrets)}
