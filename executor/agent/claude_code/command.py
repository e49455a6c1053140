"""The Claude Code CLI's command line and the environment its container gets.

Owns the flags every run uses (the runner's exact model, stream-json output with partial messages, no
permission prompts inside the sandbox, resume, the appended system prompt, the disallowed tools) and the
environment: for a sealed job a placeholder under the name the CLI expects and the gateway as its base URL;
for an unsealed one (an explicit opt-in) the runner's credential itself.

Must never: choose a model or runner other than the job's (there is no fallback anywhere), put the real
credential into a sealed job's container, or put a credential anywhere but the container's environment.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...policy import Runner
from ...sandbox.deployment import AGENT_HOME
from ...sandbox.seal import API_URL, sealed_environment
from ..launch import runner_credential

#: What the container holds instead of the runner's credential (the gateway swaps in the real one).
PLACEHOLDER_CREDENTIAL = "sk-ant-sealed-placeholder-not-a-credential"


def argv(prompt: str, model: str, resume: str | None = None, append_system_prompt: str | None = None,
         disallowed_tools: list[str] | tuple[str, ...] | None = None) -> list[str]:
    command = ["claude", "-p", prompt, "--model", model, "--output-format", "stream-json", "--verbose",
               "--include-partial-messages", "--dangerously-skip-permissions"]
    if resume:
        command += ["--resume", resume]
    if append_system_prompt:
        command += ["--append-system-prompt", append_system_prompt]
    if disallowed_tools:
        command += ["--disallowedTools", ",".join(disallowed_tools)]
    return command


def auth_var(runner: Runner) -> str:
    """The variable the CLI reads the credential from: an API key, or an OAuth token."""
    return "ANTHROPIC_API_KEY" if runner.auth_type == "api_key" else "CLAUDE_CODE_OAUTH_TOKEN"


def environment(runner: Runner, secrets: Mapping[str, str], max_retries: int = 2,
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
        return {**env, auth_var(runner): PLACEHOLDER_CREDENTIAL, "ANTHROPIC_BASE_URL": API_URL, **sealed_environment()}
    env[auth_var(runner)] = runner_credential(runner, secrets)
    if runner.base_url:
        env["ANTHROPIC_BASE_URL"] = runner.base_url
    return env
