"""The one exception tree of the executor.

Owns every error type the executor raises on purpose. Each carries what a person needs to act on it
(which job, which runner, which path, what to change). Retryability is a property of the error
(``retryable``), so a single predicate decides whether to back off and try again.

Must never: grow a second base class, or hold secrets (tokens, keys) in a message.

    ExecutorError
    ├── ConfigError          settings, policy or runner files are wrong
    ├── InvalidJob           a job file is wrong (the message says what and how to fix it)
    ├── IllegalTransition    the store refused a status change (someone else moved the job first)
    ├── WorkspaceError       overlay set-up or teardown failed
    │   └── UnsafePath       the upper dir holds something that must never be applied
    ├── Conflict             the repository changed under the job at paths the job touched
    ├── ReviewError          a review action cannot be done (not awaiting review, unknown paths, ...)
    ├── SandboxError         the container could not be created or run
    └── AgentFailed          the agent's run ended badly
        ├── RateLimited      429 / usage limit (retryable)
        ├── Overloaded       529 (retryable)
        ├── Stalled          no progress within the stall window
        ├── TimedOut         the wall-clock timeout elapsed
        ├── OutOfMemory      the kernel killed the container at its memory limit
        ├── ModelMismatch    a model other than the runner's answered
        └── TestsFailed      the test command failed
"""

from __future__ import annotations


class ExecutorError(Exception):
    """Base of every error the executor raises on purpose."""

    retryable: bool = False
    #: short machine-readable reason stored on the job (``failed`` / ``rolled_back`` jobs)
    reason: str = "error"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class ConfigError(ExecutorError):
    reason = "config"


class InvalidJob(ExecutorError):
    reason = "invalid_job"


class IllegalTransition(ExecutorError):
    reason = "illegal_transition"


class WorkspaceError(ExecutorError):
    reason = "workspace"


class UnsafePath(WorkspaceError):
    reason = "unsafe_path"


class Conflict(ExecutorError):
    reason = "conflict"

    def __init__(self, paths: list[str]) -> None:
        self.paths = sorted(paths)
        shown = ", ".join(self.paths[:20]) + (" ..." if len(self.paths) > 20 else "")
        super().__init__(
            f"the repository changed during the job at {len(self.paths)} path(s) the job also "
            f"changed: {shown}; nothing was applied, the job's changes are kept for inspection",
            paths=self.paths,
        )


class ReviewError(ExecutorError):
    reason = "review"


class SandboxError(ExecutorError):
    reason = "sandbox"


class AgentFailed(ExecutorError):
    reason = "agent_error"


class RateLimited(AgentFailed):
    retryable = True
    reason = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None, **context: object) -> None:
        super().__init__(message, retry_after=retry_after, **context)
        self.retry_after = retry_after


class Overloaded(RateLimited):
    reason = "overloaded"


class Stalled(AgentFailed):
    reason = "stalled"


class TimedOut(AgentFailed):
    reason = "timeout"


class OutOfMemory(AgentFailed):
    reason = "out_of_memory"


class ModelMismatch(AgentFailed):
    reason = "model_mismatch"

    def __init__(self, runner: str, requested: str, answered: list[str]) -> None:
        super().__init__(
            f"{runner} failed: ModelMismatch: asked for {requested!r} but "
            f"{', '.join(repr(m) for m in answered)} answered",
            runner=runner,
            requested=requested,
            answered=answered,
        )


class TestsFailed(ExecutorError):
    __test__ = False  # not a pytest class
    reason = "tests_failed"
