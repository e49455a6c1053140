"""executor: run Claude Code jobs in hardened containers on overlay workspaces; commit only what passed.

The public surface: the exception tree, the settings, and the job status machine.
"""

from .errors import (
    AgentFailed,
    ApiError,
    AuthFailed,
    Cancelled,
    CommitFailed,
    CompactionUnavailable,
    ConfigError,
    Conflict,
    EvaluationError,
    EvaluationTimedOut,
    ExecutorError,
    IllegalTransition,
    InternalError,
    Interrupted,
    InvalidJob,
    ModelMismatch,
    NoCoverageGain,
    OutOfMemory,
    Overloaded,
    RateLimited,
    Regression,
    Rejected,
    ReviewError,
    SandboxError,
    Stalled,
    TestsFailed,
    TestsOutOfMemory,
    TestsTimedOut,
    TimedOut,
    UnsafePath,
    WeakTests,
    WorkspaceError,
)
from .settings import Settings
from .store.status import Status

__all__ = [
    "AgentFailed", "ApiError", "AuthFailed", "Cancelled", "CommitFailed", "CompactionUnavailable", "ConfigError",
    "Conflict", "EvaluationError", "EvaluationTimedOut", "ExecutorError", "IllegalTransition", "InternalError",
    "Interrupted", "InvalidJob", "ModelMismatch", "NoCoverageGain", "OutOfMemory", "Overloaded", "RateLimited",
    "Regression", "Rejected", "ReviewError", "SandboxError", "Settings", "Stalled", "Status", "TestsFailed",
    "TestsOutOfMemory", "TestsTimedOut", "TimedOut", "UnsafePath", "WeakTests", "WorkspaceError",
]
