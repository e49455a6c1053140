"""Building the sandbox image as a new user does, when fetching the CLI fails: the build shows npm's own
error and what usually causes it (a TLS-intercepting proxy whose CA belongs in ``sandbox/certs/``), instead
of a bare ``exit code: 1``. The real engine and the real Dockerfile; only the first stage, asked for a
version of the CLI that does not exist (with or without a registry in reach, npm fails and says why)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_fetch_of_the_cli_shows_npms_error_and_the_certificate_hint(docker_client):
    done = subprocess.run(
        ["docker", "build", "--network", "host", "--force-rm", "--target", "cli",
         "--build-arg", "CLAUDE_CODE_VERSION=0.0.0-executor-test-missing", str(ROOT / "sandbox")],
        env={**os.environ, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, timeout=1200)
    # The classic builder colours each piece of a step's stderr (ESC[91m ... ESC[0m), however npm split it:
    # what a person reads is the text between the colours.
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert done.returncode != 0, out[-3000:]
    assert re.search(r"^npm (ERR!|error) ", out, re.M), out[-3000:]  # npm's reason, not only an exit code
    assert "fetching the Claude Code CLI 0.0.0-executor-test-missing from the npm registry failed" in out
    assert "into sandbox/certs/" in out and "intercepts TLS" in out
