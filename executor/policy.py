"""Policy and runner files: the TOML a person writes to say how jobs may run and who runs them.

Owns parsing and validating ``policies/<name>.toml`` (resource limits, timeouts, test command, network and
egress) and ``policies/runners.toml`` (named runners: model, auth variable, base URL). Unknown keys are errors.

Must never: read a secret's value (only the *name* of the variable that holds it), or start anything.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .egress_rules import parse_egress
from .errors import ConfigError
from .settings import parse_duration, parse_size

POLICY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


Duration = Annotated[float, Field(gt=0)]

#: Tools of the interactive CLI that a headless job in a sandbox has no use for (subagents, scheduling,
#: worktrees, the web from a network-restricted container, notebooks). Measured on 2.1.328: dropping them
#: shrinks every request from ~87 KB to ~51 KB (the tool definitions go from 48 KB to 20 KB).
DEFAULT_DISALLOWED_TOOLS = (
    "Agent", "Task", "ListAgents", "SendMessage", "TaskStop", "Workflow", "ScheduleWakeup", "Monitor",
    "ReportFindings", "Skill", "WebFetch", "WebSearch", "NotebookEdit", "CronCreate", "CronDelete",
    "CronList", "EnterWorktree", "ExitWorktree",
)


#: Where tests live unless a policy says otherwise (gitignore globs): Python, JavaScript/TypeScript and Go layouts.
DEFAULT_TEST_PATHS = (
    "**/tests/**", "**/test/**", "test_*.py", "*_test.py", "conftest.py",
    "*.test.js", "*.spec.js", "*.test.ts", "*.spec.ts", "*.test.jsx", "*.test.tsx", "**/__tests__/**",
    "*_test.go", "**/testdata/**",
)


class Policy(BaseModel):
    """How one job may run. Every field has a default, so a policy file names only what it changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(default=1.0, gt=0, description="Hard CPU limit of each job container (cores).")
    memory: int = Field(default=parse_size("2g"), description="Hard memory limit (no swap beyond it).")
    pids: int = Field(default=512, ge=16, description="Process limit: a fork bomb stops here.")
    disk: int = Field(
        default=parse_size("10g"), gt=0,
        description="What a job may hold on disk: the size of the filesystem (a disk image) holding every layer "
                    "it writes (upper dir, home layer, test layers); the writer gets ENOSPC there and the job "
                    "ends disk_limit. Where no image is possible, measured every few seconds instead. Each "
                    "tmpfs is min(512m, disk) besides.")
    timeout: Duration = Field(default=1800.0, description="Wall-clock limit of the agent's run.")
    network: Literal["sealed", "none", "bridge", "host"] = Field(
        default="sealed",
        description="Network of the agent container. sealed: network none, the API only through the job's "
                    "gateway (the container never holds the credential) and the outside only through its "
                    "egress proxy, as the egress list allows; none: no network at all (the CLI cannot reach "
                    "its API); bridge and host: unsealed opt-ins (an open route out, the real credential in "
                    "the container). The test gate always runs with none.",
    )
    egress: list[str] = Field(
        default_factory=list,
        description='What a sealed job may reach through its egress proxy: "host:port" entries, e.g. '
                    '["pypi.org:443", "*.npmjs.org:443"] ("*." = every subdomain). A name that resolves to a '
                    "loopback, private, link-local or metadata address is refused unless an entry names that "
                    "IP itself. Empty (default): nothing.",
    )
    test_command: str | None = Field(default=None, description="Shell command whose exit 0 gates the commit.")
    test_timeout: Duration = Field(default=600.0, description="Wall-clock limit of the test run.")
    evaluation: Literal["exit-code", "tests"] = Field(
        default="exit-code",
        description="The gate: exit-code (the test command's exit 0 commits) or tests (graded per test from the "
                    "JUnit XML report the command writes to $EXECUTOR_JUNIT_XML: no regression, and the job's "
                    "own tests must fail without its change and pass with it).")
    test_paths: tuple[str, ...] = Field(
        default=DEFAULT_TEST_PATHS,
        description="Globs of test files: the graded gate's tests-only run applies the job's changes there only.")
    flaky_reruns: int = Field(
        default=2, ge=0, le=10,
        description="Times the graded gate re-runs a test command whose tests failed with the change: a test that "
                    "flips is flaky and counts for nothing.")
    on_weak_tests: Literal["rollback", "review"] = Field(
        default="rollback",
        description="A job whose tests prove nothing: rolled back (weak_tests) or sent to a person's review.")
    evaluation_timeout: Duration = Field(
        default=1800.0, description="Wall-clock limit of all the graded gate's runs together.")
    heartbeat_interval: Duration = Field(default=30.0, description="Seconds between heartbeat rows.")
    stall_after: Duration = Field(default=300.0, description="No progress for this long is a stall.")
    stall_cpu_threshold: float = Field(
        default=0.05, ge=0,
        description="CPU cores (averaged over a heartbeat interval) that count as progress without output. "
                    "A CLI waiting on an unanswered request burns ~0.003 cores, a working build far more.",
    )
    retry_stalled: bool = Field(default=False, description="Re-queue a stalled job from the clean repository.")
    disallowed_tools: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DISALLOWED_TOOLS),
        description="Claude Code tools a batch job does not get (--disallowedTools): their definitions ride "
                    "along in every request otherwise. [] gives the CLI's full set.",
    )
    max_attempts: int = Field(default=4, ge=1, description="Attempts a rate-limited/overloaded job gets in all.")
    backoff_initial: Duration = Field(default=15.0, description="First wait after a rate limit.")
    backoff_multiplier: float = Field(default=2.0, ge=1, description="Each further wait is this much longer.")
    backoff_max: Duration = Field(default=900.0, description="No single wait is longer (unless the API says so).")
    cli_max_retries: int = Field(
        default=2, ge=0,
        description="CLAUDE_CODE_MAX_RETRIES in the container: the CLI's own quick retries before the "
                    "executor's recorded backoff (which frees the slot) takes over.",
    )
    review: Literal["never", "auto", "always"] = Field(
        default="auto",
        description="When a job whose tests passed waits for a person before it is committed: never, auto "
                    "(when a trigger fires: review_paths, protected_paths, review_max_changed_lines, or the "
                    "model's own REVIEW: line) or always.",
    )
    review_paths: tuple[str, ...] = Field(
        default=(), description="Globs (migrations/**, .github/**, Dockerfile): a change there needs a person.")
    protected_paths: tuple[str, ...] = Field(
        default=("tests/**",),
        description="Globs of what the job is judged by: the agent changing them needs a person.")
    review_max_changed_lines: int | None = Field(
        default=None, ge=0, description="More changed lines (added + removed) than this need a person.")

    context: Literal["compact", "resume", "full"] = Field(
        default="compact",
        description="How a follow-up job (its session has finished jobs) starts: compact (a fresh conversation "
                    "whose system prompt carries the session brief), resume (continue the previous job's "
                    "conversation as it is) or full (a fresh conversation carrying the raw session history).",
    )
    compaction_required: bool = Field(
        default=False,
        description="Fail a follow-up job whose brief cannot be written by the small model, instead of "
                    "starting it with the structural brief.",
    )

    land: Literal["files", "commit", "branch"] = Field(
        default="files",
        description="How a committed change reaches the repository: files (copied into the working tree), commit "
                    "(copied, and committed on the current branch: only the job's paths, with the agent's summary, "
                    "the prompt and Executor-* trailers) or branch (the working tree, index and HEAD untouched: a "
                    "commit on executor/<job id> whose parent is the HEAD the job started from; `executor land ID` "
                    "applies it later). commit and branch need a git repository.")

    session_carry: tuple[str, ...] = Field(
        default=(".claude/projects/**/*.jsonl",),
        description="Globs of the agent's home that a committed job hands on to the next job of its session. "
                    "By default only Claude Code's transcripts; hooks, settings.json, shell rc files and shell "
                    "snapshots run code in the next job: name them here only if you want exactly that.")

    @field_validator("egress")
    @classmethod
    def _egress(cls, value: list[str]) -> list[str]:
        parse_egress(value)  # raises ValueError naming the bad entry and how to write it
        return value

    @model_validator(mode="after")
    def _egress_needs_sealed(self) -> Policy:
        if self.egress and self.network != "sealed":
            raise ValueError(f"egress is enforced only for network = \"sealed\" (this policy has network = "
                             f"\"{self.network}\"): remove egress or set network = \"sealed\"")
        return self

    @property
    def sealed(self) -> bool:
        return self.network == "sealed"

    @property
    def unsealed(self) -> bool:
        """An explicit opt-in to an open route out with the real credential in the container."""
        return self.network in ("bridge", "host")

    @field_validator("memory", "disk", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, (str, int, float)) else value

    @field_validator("timeout", "test_timeout", "heartbeat_interval", "stall_after", "backoff_initial",
                     "backoff_max", "evaluation_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, (str, int, float)) else value


class Runner(BaseModel):
    """A named way to reach a model: exactly one model, one credential, no fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str = Field(description="Exact model id passed to --model (no aliases).")
    auth_env: str = Field(description="Name of the executor's environment variable holding the credential.")
    auth_type: Literal["api_key", "oauth_token"] = Field(
        default="api_key",
        description="api_key -> ANTHROPIC_API_KEY, oauth_token -> CLAUDE_CODE_OAUTH_TOKEN in the container.",
    )
    base_url: str | None = Field(default=None, description="Becomes ANTHROPIC_BASE_URL.")
    max_concurrent: int | None = Field(default=None, ge=1, description="Jobs of this runner at once.")

    @property
    def container_auth_var(self) -> str:
        return "ANTHROPIC_API_KEY" if self.auth_type == "api_key" else "CLAUDE_CODE_OAUTH_TOKEN"


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid TOML: nested too deeply to be read") from None


def _explain(path: Path, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
    )
    return f"{path}: {problems}"


def load_policy(policies_dir: Path, name: str) -> Policy:
    """The policy ``NAME`` (file ``NAME.toml`` in the policies directory)."""
    if not POLICY_NAME.match(name) or name == "runners":
        raise ConfigError(f"policy name {name!r} is not a policy file name in {policies_dir}")
    path = policies_dir / f"{name}.toml"
    try:
        return Policy(**_read_toml(path))
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc)) from None


def load_runners(policies_dir: Path) -> dict[str, Runner]:
    """Every runner of ``runners.toml``, by name."""
    path = policies_dir / "runners.toml"
    data = _read_toml(path)
    unknown = set(data) - {"runners"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; only [runners.NAME] tables")
    runners: dict[str, Runner] = {}
    for name, table in data.get("runners", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: runners.{name} must be a table")
        try:
            runners[name] = Runner(name=name, **table)
        except ValidationError as exc:
            raise ConfigError(_explain(path, exc)) from None
    return runners
