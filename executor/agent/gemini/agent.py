"""The Gemini CLI behind the agent seam (``agent/seam.py``).

Owns what the executor asks of the Gemini CLI: its command line, settings file and environment
(``command.py``), its stream and how a run ended (``stream.py``) and the Gemini API its gateway speaks
(``api.py``). A later job of a session is briefed (the CLI resumes only by its own index of a project's
sessions, not by the id its stream gives: not used). Its stream never names the model that answered: the
gateway reads it from each answer.

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
from ..outcome import Outcome
from ..seam import Agent, Launch, LaunchRequest, Run
from . import command
from .api import GEMINI_API
from .stream import GeminiRun, classify, tool_action


class GeminiCli(Agent):
    name = "gemini"
    cli = "gemini"
    protocol = GEMINI_API
    names_models = False
    carry = ()

    def launch(self, request: LaunchRequest) -> Launch:
        policy, runner = request.policy, request.runner
        return Launch(argv=command.argv(request.prompt, runner.model, request.system),
                      environment=command.environment(runner, request.secrets, sealed=request.sealed),
                      files={command.SETTINGS: command.settings(policy.cli_max_retries)})

    def run(self, clock: Callable[[], datetime] = utcnow) -> Run:
        return GeminiRun(clock=clock)

    def classify(self, run: Run, exit_code: int | None, now: datetime | None = None) -> Outcome:
        assert isinstance(run, GeminiRun)
        return classify(run, exit_code)

    def summarizer(self, settings: Settings, secrets: Mapping[str, str], runner: Runner) -> Summarizer:
        raise CompactionUnavailable(f"runner {runner.name!r} runs gemini, whose briefs have no small model yet: "
                                    "the structural brief is used")

    def transcript_readable(self, homes: list[Path], session_id: str) -> bool:
        return False  # never resumed: briefed instead

    def tool_action(self, name: str) -> str | None:
        return tool_action(name)


GEMINI = GeminiCli()
