"""Which agent a runner names: the one place that knows every agent package.

Owns ``AGENTS`` (each agent's name, as ``runners.toml`` gives it, to its ``Agent``), ``agent_for`` and the
policy keys whose default is the agent's own (``resolved``, ``session_carry``).

Must never: fall back to another agent than the one a runner names (an unknown name is an error).
"""

from __future__ import annotations

from ..errors import ConfigError
from ..policy import AGENT_NAMES, Policy, Runner
from ..store import Job
from .claude_code.agent import CLAUDE_CODE
from .codex.agent import CODEX
from .gemini.agent import GEMINI
from .seam import Agent

AGENTS: dict[str, Agent] = {agent.name: agent for agent in (CLAUDE_CODE, CODEX, GEMINI)}
assert set(AGENTS) <= set(AGENT_NAMES)


def agent_named(name: str) -> Agent:
    agent = AGENTS.get(name)
    if agent is None:
        raise ConfigError(f"unknown agent {name!r}: the agents are {', '.join(sorted(AGENTS))}")
    return agent


def agent_for(runner: Runner) -> Agent:
    """The agent ``runner`` runs."""
    return agent_named(runner.agent)


def resolved(policy: Policy, runner: Runner) -> Policy:
    """``policy`` with the keys it leaves to the agent filled in by ``runner``'s agent (the tools a headless job
    does not get, what a session hands on): what a job is accepted with."""
    agent = agent_for(runner)
    update: dict = {}
    if policy.disallowed_tools is None:
        update["disallowed_tools"] = list(agent.disallowed_tools)
    if policy.session_carry is None:
        update["session_carry"] = agent.carry
    return policy.model_copy(update=update) if update else policy


def session_carry(job: Job) -> tuple[str, ...]:
    """The globs of the job's home its session keeps: its policy's, else its agent's transcripts."""
    carry = Policy(**job.policy).session_carry
    return tuple(carry) if carry is not None else agent_named(job.agent).carry
