"""The seam between the executor and a coding agent's CLI: everything that differs between agents, behind one
interface that returns the executor's own types.

Owns ``Agent`` (what the executor asks of an agent: the command line, environment and configuration files of a
run; a fresh ``Run`` to read its stream into the executor's events; how a run ended; whether a session's
transcript can be resumed; what a committed job hands on in its home; the API protocol its sealed gateway
speaks; the small model that writes session briefs through the runner's provider; what its tools do),
``LaunchRequest`` / ``Launch`` (what a run is asked to do, and what starts it) and ``Run`` (the state of one
run as the executor reads it). Each agent is one package under ``executor/agent/`` implementing ``Agent``;
``registry.py`` finds it by the name a runner gives (``agent = "..."``).

Must never: name an agent's tools, files, flags or headers (those belong to its package), or choose a model
or runner other than the job's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ..clock import utcnow
from ..errors import CompactionUnavailable
from ..policy import Policy, Runner
from ..sandbox.api import ApiProtocol
from ..session.summarizer import Summarizer
from ..settings import Settings
from .events import Event
from .outcome import Outcome


@dataclass(frozen=True)
class LaunchRequest:
    """One run of the agent, as the executor asks for it."""

    prompt: str
    runner: Runner
    policy: Policy
    secrets: Mapping[str, str]
    sealed: bool
    #: the agent's own session to continue (its id as the agent's stream gave it), or None for a new one
    resume: str | None = None
    #: what the executor adds to the agent's system prompt (the review instruction, a session brief)
    system: str | None = None


@dataclass(frozen=True)
class Launch:
    """What starts a run: the CLI's argv (the executor wraps it), its environment, and its configuration files
    by name, which the executor serves read-only at ``launch.CONFIG_MOUNT`` (never a credential)."""

    argv: list[str]
    environment: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)


class Run(Protocol):
    """One run's state as the executor reads it, fed line by line."""

    models_seen: list[str]  # the models that answered, as the stream names them ([] where it never does)
    final_text: str  # the agent's last words
    last_activity: str  # what it is doing, in one line
    lines: int

    def feed(self, msg: dict | None) -> list[Event]: ...

    @property
    def session_id(self) -> str | None: ...  # the agent's session, to resume it
    @property
    def ended(self) -> bool: ...  # the CLI reported its end (its result)
    @property
    def error_statuses(self) -> list[int]: ...  # HTTP statuses of the failed API calls the CLI reported
    @property
    def cost_usd(self) -> float | None: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...


class Agent:
    """One coding agent's CLI. A subclass per agent package; one instance each (``registry.py``)."""

    #: the name runners.toml gives (``agent = "..."``)
    name = ""
    #: the executable in the sandbox image (``doctor`` checks it is there)
    cli = ""
    #: the API its sealed gateway speaks (routes, credential headers, usage, rate-limit headers, errors)
    protocol: ApiProtocol
    #: its stream names the model that answered each turn; else the gateway reads it from each answer
    names_models = False
    #: names its stream gives in a model's place to the CLI's own messages (never a model that answered)
    own_voices: frozenset[str] = frozenset()
    #: globs of its home a committed job hands on to the next job of its session (``session_carry`` default)
    carry: tuple[str, ...] = ()
    #: tools of the CLI a headless job does not get (``disallowed_tools`` default), by the CLI's own names
    disallowed_tools: tuple[str, ...] = ()
    #: a resumed conversation keeps the system prompt it began with: what must reach it goes in the prompt
    resume_keeps_system = True

    def launch(self, request: LaunchRequest) -> Launch:
        raise NotImplementedError

    def run(self, clock: Callable[[], datetime] = utcnow) -> Run:
        """A fresh state for one run."""
        raise NotImplementedError

    def classify(self, run: Run, exit_code: int | None, now: datetime | None = None) -> Outcome:
        """How the run ended, from what its stream said and the CLI's exit code (None: it was killed)."""
        raise NotImplementedError

    def transcript_readable(self, homes: list[Path], session_id: str) -> bool:
        """Whether the session's transcript is in one of ``homes`` (an attempt's home layer, the committed home)
        and reads: else a resume starts fresh."""
        raise NotImplementedError

    def tool_action(self, name: str) -> str | None:
        """``read``, ``edit`` or ``shell`` for one of the CLI's tools that does that (the session's history)."""
        return None

    def summarizer(self, settings: Settings, secrets: Mapping[str, str], runner: Runner) -> Summarizer:
        """The small model that writes session briefs, through ``runner``'s provider, endpoint and credential:
        the runner's ``compaction_model``. ``CompactionUnavailable`` says why there is none."""
        raise CompactionUnavailable(f"runner {runner.name!r} names no compaction_model")

    def compaction_model(self, settings: Settings, runner: Runner) -> str | None:
        """The small model a runner's briefs are written by, or None."""
        return runner.compaction_model
