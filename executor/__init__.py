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
    SchemaTooNew,
    Stalled,
    TestsFailed,
    TestsOutOfMemory,
    TestsTimedOut,
    TimedOut,
    UnknownSetting,
    UnsafePath,
    WeakTests,
    WorkspaceError,
)
from .store.status import Status

__all__ = [
    "AgentFailed", "ApiError", "AuthFailed", "Cancelled", "CommitFailed", "CompactionUnavailable", "ConfigError",
    "Conflict", "EvaluationError", "EvaluationTimedOut", "ExecutorError", "IllegalTransition", "InternalError",
    "Interrupted", "InvalidJob", "ModelMismatch", "NoCoverageGain", "OutOfMemory", "Overloaded", "RateLimited",
    "Regression", "Rejected", "ReviewError", "SandboxError", "SchemaTooNew", "Settings", "Stalled", "Status",
    "TestsFailed", "TestsOutOfMemory", "TestsTimedOut", "TimedOut", "UnknownSetting", "UnsafePath", "WeakTests",
    "WorkspaceError",
]


def __getattr__(name: str):
    # Settings loads pydantic-settings (a tenth of a second): only when asked for, so that `executor status`
    # and `executor health`, which read a snapshot, answer without it.
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
