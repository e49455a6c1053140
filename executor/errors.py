"""The one exception tree of the executor, and the vocabulary of how a job ends.

Owns every error type the executor raises on purpose. Each carries what a person needs to act on it
(which job, which runner, which path, what to change), the short ``reason`` stored on a job that ends
with it, and ``ends_as``, the status such a job gets. Retryability is a property of the error
(``retryable``), so a single predicate decides whether to back off and try again. A job's ending reason
is always one of these classes' ``reason`` (or ``COMMITTED`` / ``AWAITING_REVIEW`` for the two endings
that are not errors).

Must never: grow a second base class, or hold secrets (tokens, keys) in a message.

    ExecutorError
    ├── ConfigError              settings, policy or runner files are wrong
    │   ├── UnknownSetting       an EXECUTOR_* variable that names no setting (a typo that would do nothing)
    │   └── SchemaTooNew         the database was migrated by a newer executor than this one
    ├── InvalidJob               a job file is wrong (the message says what and how to fix it)
    ├── IllegalTransition        the store refused a status change (someone else moved the job first)
    ├── InternalError            a bug in the executor ended the job (see its log)
    ├── Interrupted              the executor stopped during the attempt: rolled back and re-queued
    │   ├── EngineUnavailable    the container engine was lost during the attempt (its end is not known)
    │   └── StoreUnavailable     the store could not be reached or written during the attempt
    ├── Unsettled                the attempt's ending is known but could not be recorded yet
    ├── Cancelled                a person cancelled the job
    ├── WorkspaceError           overlay set-up or teardown failed
    │   ├── UnsafePath           the upper dir holds something that must never be applied
    │   ├── WorkspaceChanged     the repository is no longer the directory the job was accepted with
    │   ├── CommitFailed         the change could not be written into the repository
    │   ├── ChangeGone           the kept change a reviewer's follow-up was to revise is gone
    │   ├── GitError             git refused or could not do what landing the change as a commit needs
    │   └── DiskImageError       a job's disk image could not be made, mounted or unmounted
    ├── Conflict                 the repository changed under the job at paths the job touched
    ├── ReviewError              a review action cannot be done (not awaiting review, unknown paths, ...)
    │   └── Rejected             a person rejected the change
    │       └── ChangesRequested a person asked for changes: a follow-up job revises the kept change
    ├── SandboxError             the container could not be created or run
    ├── CompactionUnavailable    the small model could not write the brief and the policy requires it
    ├── EvaluationError          the graded gate could not grade the change (no or a broken report, no coverage)
    │   └── EvaluationTimedOut   the graded gate's runs together took longer than evaluation_timeout
    ├── AgentFailed              the agent's run ended badly (rolled back)
    │   ├── RateLimited          429 / usage limit (retryable)
    │   │   └── Overloaded       529 (retryable)
    │   ├── AuthFailed           the API refused the runner's credential
    │   ├── ApiError             another API error (spend cap, bad request, ...)
    │   ├── Stalled              no progress within the stall window
    │   ├── TimedOut             the wall-clock timeout elapsed
    │   ├── OutOfMemory          the kernel killed the container at its memory limit
    │   ├── DiskLimit            the job wrote more than its policy's disk cap
    │   │   └── DiskReserve      the state root's free space fell below the reserve: the largest writer stops
    │   └── ModelMismatch        a model other than the runner's answered, or was asked for (sealed)
    └── TestsFailed              the test command failed (rolled back)
        ├── TestsTimedOut        the tests ran longer than test_timeout
        ├── TestsOutOfMemory     the tests hit the memory limit
        ├── Regression           a test that passed before the change fails, is skipped or is gone after it
        └── WeakTests            the job's tests prove nothing: none fails without its change and passes with it
            └── NoCoverageGain   a test-only job's tests cover no line or branch the suite left uncovered
"""

from __future__ import annotations

#: The reason of a job whose change was applied.
COMMITTED = "committed"
#: The reason of a job whose tested change waits for a person.
AWAITING_REVIEW = "review"


class ExecutorError(Exception):
    """Base of every error the executor raises on purpose."""

    retryable: bool = False
    #: short machine-readable reason stored on a job that ends with this error
    reason: str = "error"
    #: the status (a ``store.Status`` value) of a job whose attempt ends with this error
    ends_as: str = "failed"
    #: whether the attempt's upper dir is kept (for inspection, or for a person to decide)
    keeps_change: bool = False

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return self.message


class ConfigError(ExecutorError):
    reason = "config"


class UnknownSetting(ConfigError):
    """An ``EXECUTOR_*`` variable that names no setting: a typo that would silently do nothing."""

    reason = "unknown_setting"


class SchemaTooNew(ConfigError):
    reason = "schema_too_new"


class InvalidJob(ExecutorError):
    reason = "invalid_job"


class IllegalTransition(ExecutorError):
    reason = "illegal_transition"


class InternalError(ExecutorError):
    reason = "internal"


class Interrupted(ExecutorError):
    reason = "interrupted"
    ends_as = "queued"


class EngineUnavailable(Interrupted):
    """The container engine could not be reached (or restarted) during the attempt: what the attempt saw of
    its containers is not to be trusted. The job stays its host's; once the engine answers again its
    container is adopted if it still runs, else the attempt is rolled back and the job re-queued."""

    reason = "engine_unavailable"


class StoreUnavailable(Interrupted):
    """The store could not be reached or written (a database restart, a dropped connection, SQLITE_BUSY, a
    full disk) during the attempt. The job stays its host's and is recovered once the store answers."""

    reason = "store_unavailable"


class Unsettled(ExecutorError):
    """An attempt whose ending is known could not record it (the engine or the store failed while it
    settled): its host keeps the job and settles it with ``ending`` once both answer. Never a job's ending."""

    reason = "unsettled"

    def __init__(self, message: str, ending: object, status: object) -> None:
        super().__init__(message)
        self.ending, self.status = ending, status


class Cancelled(ExecutorError):
    reason = "cancelled"
    ends_as = "cancelled"


class WorkspaceError(ExecutorError):
    reason = "workspace"


class UnsafePath(WorkspaceError):
    reason = "unsafe_path"


class WorkspaceChanged(WorkspaceError):
    reason = "workspace_changed"


class CommitFailed(WorkspaceError):
    reason = "commit_failed"
    keeps_change = True


class Conflict(ExecutorError):
    reason = "conflict"
    keeps_change = True

    def __init__(self, paths: list[str]) -> None:
        self.paths = sorted(paths)
        shown = ", ".join(self.paths[:20]) + (" ..." if len(self.paths) > 20 else "")
        super().__init__(
            f"the repository changed during the job at {len(self.paths)} path(s) the job also "
            f"changed: {shown}; nothing was applied, the job's changes are kept for inspection",
            paths=self.paths,
        )


class GitError(WorkspaceError):
    """git refused or could not do what landing a change in git needs (policy ``land = "commit"`` or
    ``"branch"``): not a git repository, a merge underway, a detached HEAD, a branch that moved or exists."""

    reason = "git"
    keeps_change = True


class ChangeGone(WorkspaceError):
    reason = "change_gone"


class DiskImageError(WorkspaceError):
    reason = "disk_image"


class ReviewError(ExecutorError):
    reason = "review"


class Rejected(ReviewError):
    reason = "rejected"
    ends_as = "rolled_back"


class ChangesRequested(Rejected):
    """The job ends; its kept change is handed to the follow-up job that revises it (not removed here)."""

    reason = "changes_requested"
    keeps_change = True


class SandboxError(ExecutorError):
    reason = "sandbox"


class CompactionUnavailable(ExecutorError):
    """The small model could not write the brief (after its retries) and the policy requires it."""

    reason = "compaction_unavailable"


class EvaluationError(ExecutorError):
    """The graded gate (``evaluation = "tests"``) could not grade the change: never a pass."""

    reason = "evaluation_error"


class EvaluationTimedOut(EvaluationError):
    reason = "evaluation_timeout"


class AgentFailed(ExecutorError):
    reason = "agent_error"
    ends_as = "rolled_back"


class RateLimited(AgentFailed):
    retryable = True
    reason = "rate_limited"
    ends_as = "failed"  # once the retries are spent; before that the job waits (waiting_retry)

    def __init__(self, message: str, retry_after: float | None = None, **context: object) -> None:
        super().__init__(message, retry_after=retry_after, **context)
        self.retry_after = retry_after


class Overloaded(RateLimited):
    reason = "overloaded"


class AuthFailed(AgentFailed):
    reason = "auth_error"
    ends_as = "failed"


class ApiError(AgentFailed):
    reason = "api_error"
    ends_as = "failed"


class Stalled(AgentFailed):
    reason = "stalled"
    ends_as = "stalled"


class TimedOut(AgentFailed):
    reason = "timeout"
    ends_as = "failed"


class OutOfMemory(AgentFailed):
    reason = "out_of_memory"
    ends_as = "failed"


class DiskLimit(AgentFailed):
    reason = "disk_limit"
    ends_as = "failed"


class DiskReserve(DiskLimit):
    reason = "disk_reserve"


class ModelMismatch(AgentFailed):
    reason = "model_mismatch"
    ends_as = "failed"

    def __init__(self, runner: str, requested: str, answered: list[str], refused_at_gateway: bool = False) -> None:
        others = ", ".join(repr(m) for m in answered)
        what = (f"the runner's model is {requested!r} but the agent asked for {others}, which the sealed "
                "sandbox's API gateway refused before it reached the API") if refused_at_gateway else \
            f"asked for {requested!r} but {others} answered"
        super().__init__(f"{runner} failed: ModelMismatch: {what}", runner=runner, requested=requested,
                         answered=answered)


class TestsFailed(ExecutorError):
    __test__ = False  # not a pytest class
    reason = "tests_failed"
    ends_as = "rolled_back"


class TestsTimedOut(TestsFailed):
    reason = "tests_timeout"


class TestsOutOfMemory(TestsFailed):
    reason = "tests_out_of_memory"


class Regression(TestsFailed):
    """Raised by the graded gate with ``tests=[ids]``: the broken tests, as the report names them."""

    reason = "regression"


class WeakTests(TestsFailed):
    """Raised by the graded gate with ``tests=[ids]``: the job's tests that proved nothing."""

    reason = "weak_tests"


class NoCoverageGain(WeakTests):
    reason = "no_coverage_gain"

