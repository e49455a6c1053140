"""executor: run Claude Code jobs in hardened containers on overlay workspaces; commit only what passed."""

from .errors import (
    AgentFailed, ConfigError, Conflict, ExecutorError, IllegalTransition, InvalidJob, ModelMismatch,
    OutOfMemory, Overloaded, RateLimited, SandboxError, Stalled, TestsFailed, TimedOut, UnsafePath,
    WorkspaceError,
)
from .settings import Settings
from .store import Status

__all__ = [
    "AgentFailed", "ConfigError", "Conflict", "ExecutorError", "IllegalTransition", "InvalidJob",
    "ModelMismatch", "OutOfMemory", "Overloaded", "RateLimited", "SandboxError", "Settings", "Stalled",
    "Status", "TestsFailed", "TimedOut", "UnsafePath", "WorkspaceError",
]
