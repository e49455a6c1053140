"""Claude Code behind the agent seam (``agent/seam.py``).

Owns what the executor asks of Claude Code: the run's command line and environment (``command.py``), its
stream (``stream.py``, ``events.py``) and how a run ended (``outcome.py``), where its transcripts lie (so a
later job resumes the conversation: ``--resume``), what a committed job hands on in its home, the tools a
headless job does not get, the Messages API its gateway speaks (``api.py``) and the small model that writes
briefs (``summarizer.py``: ``EXECUTOR_COMPACTION_MODEL`` unless the runner names one).

Must never: choose a model other than the runner's, or put the real credential into a sealed container.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from ...clock import utcnow
from ...errors import CompactionUnavailable
from ...policy import Runner
from ...settings import Settings
from ...transaction.home import transcript_readable
from ..outcome import Outcome
from ..seam import Agent, Launch, LaunchRequest, Run
from . import command
from .api import MESSAGES
from .events import SYNTHETIC_MODEL, tool_action
from .outcome import classify
from .stream import StreamState
from .summarizer import Summarizer

#: The conversation transcripts: what ``--resume`` needs, and all a committed job hands on by default (hooks,
#: settings.json, shell rc files and snapshots would run code in the next job).
CARRY = (".claude/projects/**/*.jsonl",)

#: Tools of the interactive CLI that a headless job in a sandbox has no use for (subagents, scheduling,
#: worktrees, the web from a network-restricted container, notebooks). Measured on 2.1.328: dropping them
#: shrinks every request from ~87 KB to ~51 KB (the tool definitions go from 48 KB to 20 KB).
DISALLOWED_TOOLS = (
    "Agent", "Task", "ListAgents", "SendMessage", "TaskStop", "Workflow", "ScheduleWakeup", "Monitor",
    "ReportFindings", "Skill", "WebFetch", "WebSearch", "NotebookEdit", "CronCreate", "CronDelete",
    "CronList", "EnterWorktree", "ExitWorktree",
)


class ClaudeCode(Agent):
    name = "claude-code"
    cli = "claude"
    protocol = MESSAGES
    names_models = True
    own_voices = frozenset({SYNTHETIC_MODEL})
    carry = CARRY
    disallowed_tools = DISALLOWED_TOOLS
    # Claude Code 2.1.328 does not apply a new --append-system-prompt to a resumed conversation
    resume_keeps_system = True

    def launch(self, request: LaunchRequest) -> Launch:
        policy, runner = request.policy, request.runner
        tools = policy.disallowed_tools if policy.disallowed_tools is not None else self.disallowed_tools
        return Launch(
            argv=command.argv(request.prompt, runner.model, request.resume, request.system, tools),
            environment=command.environment(runner, request.secrets, max_retries=policy.cli_max_retries,
                                            sealed=request.sealed))

    def run(self, clock: Callable[[], datetime] = utcnow) -> Run:
        return StreamState(clock=clock)

    def classify(self, run: Run, exit_code: int | None, now: datetime | None = None) -> Outcome:
        assert isinstance(run, StreamState)
        return classify(run, exit_code, now)

    def transcript_readable(self, homes: list[Path], session_id: str) -> bool:
        return transcript_readable(homes, [".claude", "projects", "*", f"{session_id}.jsonl"])

    def tool_action(self, name: str) -> str | None:
        return tool_action(name)

    def compaction_model(self, settings: Settings, runner: Runner) -> str | None:
        return runner.compaction_model or settings.compaction_model

    def summarizer(self, settings: Settings, secrets: Mapping[str, str], runner: Runner) -> Summarizer:
        credential = secrets.get(runner.auth_env)
        if not credential:
            raise CompactionUnavailable(
                f"the small model's credential is missing: runner {runner.name!r}'s {runner.auth_env} is not set "
                "in the executor's environment")
        return Summarizer(self.compaction_model(settings, runner) or settings.compaction_model, credential,
                          runner.base_url, runner.auth_type, attempts=settings.compaction_attempts,
                          backoff=settings.compaction_backoff)


CLAUDE_CODE = ClaudeCode()
