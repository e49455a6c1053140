"""The Codex CLI behind the agent seam (``agent/seam.py``).

Owns what the executor asks of Codex: the run's command line and environment (``command.py``), its stream
(``stream.py``, ``events.py``) and how a run ended (``outcome.py``), where its session transcripts lie (a later
job of the session continues the thread: ``codex exec resume``), what a committed job hands on in its home,
the features a headless job does not get, and the Responses API its gateway speaks (``api.py``). Its stream
never names the model that answered: the gateway reads it from each answer (``names_models = False``).

Must never: choose a model other than the runner's, or put the real credential into a sealed container.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from ...clock import utcnow
from ...errors import CompactionUnavailable
from ...policy import Runner
from ...session.summarizer import Summarizer
from ...settings import Settings
from ...transaction.home import transcript_readable
from ..outcome import Outcome
from ..seam import Agent, Launch, LaunchRequest, Run
from . import command
from .api import RESPONSES
from .events import tool_action
from .outcome import classify
from .stream import CodexRun

#: The thread's rollouts: what ``exec resume`` needs, and all a committed job hands on by default (Codex's
#: databases, config, skills and shell snapshots are the CLI's own, or would run code in the next job).
CARRY = (".codex/sessions/**/rollout-*.jsonl",)

#: Features of the CLI a headless job in a sandbox has no use for, by Codex's own names (``--disable``):
#: plugins and apps (they call other hosts at start), subagents, goals, image generation, browser and
#: computer use, hooks (code the job's files would run in the CLI), the in-app updater.
DISABLED = ("plugins", "remote_plugin", "apps", "multi_agent", "goals", "image_generation", "browser_use",
            "computer_use", "hooks", "in_app_updates")


class Codex(Agent):
    name = "codex"
    cli = "codex"
    protocol = RESPONSES
    names_models = False
    carry = CARRY
    disallowed_tools = DISABLED

    def launch(self, request: LaunchRequest) -> Launch:
        policy, runner = request.policy, request.runner
        disabled = policy.disallowed_tools if policy.disallowed_tools is not None else self.disallowed_tools
        return Launch(
            argv=command.argv(request.prompt, runner.model, command.base_url(runner, request.sealed),
                              policy.cli_max_retries, request.resume, request.system, disabled),
            environment=command.environment(runner, request.secrets, sealed=request.sealed))

    def run(self, clock: Callable[[], datetime] = utcnow) -> Run:
        return CodexRun(clock=clock)

    def classify(self, run: Run, exit_code: int | None, now: datetime | None = None) -> Outcome:
        assert isinstance(run, CodexRun)
        return classify(run, exit_code, now)

    def summarizer(self, settings: Settings, secrets: Mapping[str, str], runner: Runner) -> Summarizer:
        # Not built yet: a later job of a codex session continues the thread (context = "resume"), or is
        # briefed without model summaries (the structural brief).
        raise CompactionUnavailable(f"runner {runner.name!r} runs codex, whose briefs have no small model yet: "
                                    "the structural brief is used (or set the policy's context = \"resume\")")

    def transcript_readable(self, homes: list[Path], session_id: str) -> bool:
        return transcript_readable(homes, [".codex", "sessions", "*", "*", "*", f"rollout-*-{session_id}.jsonl"])

    def tool_action(self, name: str) -> str | None:
        return tool_action(name)


CODEX = Codex()
