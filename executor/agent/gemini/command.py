"""The Gemini CLI's command line, its settings file and the environment its container gets.

Owns the flags every run uses (``-p`` headless, the runner's exact model, ``stream-json`` output, ``--yolo``:
no approvals inside the job's container), the system settings file the executor serves read-only
(``GEMINI_CLI_SYSTEM_SETTINGS_PATH``: the API-key auth the base URL needs, folder trust off so ``--yolo``
holds, usage statistics and telemetry off, ``general.maxAttempts`` = the policy's ``cli_max_retries`` + 1,
else a 429 is retried ten times over four minutes) and the environment: for a sealed job a placeholder
credential and the gateway as ``GOOGLE_GEMINI_BASE_URL``; for an unsealed one the runner's credential itself.
The executor's system prompt leads the prompt (``GEMINI_SYSTEM_MD`` would replace the CLI's own).

Must never: choose a model or runner other than the job's, put the real credential into a sealed job's
container, or put a credential anywhere but the container's environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ...policy import Runner
from ...sandbox.deployment import AGENT_HOME
from ...sandbox.seal import API_URL, sealed_environment
from ..launch import CONFIG_MOUNT, runner_credential
from .api import PUBLIC_API

PLACEHOLDER_CREDENTIAL = "sealed-placeholder-not-a-credential"
SETTINGS = "settings.json"


def argv(prompt: str, model: str, system: str | None = None) -> list[str]:
    text = f"{system}\n\n{prompt}" if system else prompt
    return ["gemini", "-p", text, "-m", model, "--output-format", "stream-json", "--yolo"]


def settings(max_retries: int) -> bytes:
    return json.dumps({
        "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
        "general": {"maxAttempts": max(1, int(max_retries) + 1), "enableAutoUpdate": False,
                    "enableAutoUpdateNotification": False},
    }, indent=1).encode()


def environment(runner: Runner, secrets: Mapping[str, str], sealed: bool = False) -> dict[str, str]:
    env = {"HOME": AGENT_HOME, "GEMINI_CLI_SYSTEM_SETTINGS_PATH": f"{CONFIG_MOUNT}/{SETTINGS}", "NO_COLOR": "1"}
    if sealed:
        return {**env, "GEMINI_API_KEY": PLACEHOLDER_CREDENTIAL, "GOOGLE_GEMINI_BASE_URL": API_URL,
                **sealed_environment()}
    return {**env, "GEMINI_API_KEY": runner_credential(runner, secrets),
            "GOOGLE_GEMINI_BASE_URL": runner.base_url or PUBLIC_API}
