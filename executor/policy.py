"""Policy and runner files: the TOML a person writes to say how jobs may run and who runs them.

Owns parsing and validating ``policies/<name>.toml`` (resource limits, timeouts, test command, network and
egress) and ``policies/runners.toml`` (named runners: the agent, its model, auth variable, base URL, the small
model of its briefs). Unknown keys are errors. A policy key means the same for every agent; where its default is
the agent's own (the tools a headless job does not get, what a session hands on), the policy leaves it unset and
the job's agent fills it in when the job is accepted.

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

#: The agents a runner may name (each one package under ``executor/agent/``).
AGENT_NAMES = ("claude-code", "codex", "gemini")


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
    runtime: Literal["runc", "runsc"] | None = Field(
        default=None,
        description="The OCI runtime of every container of the job (agent, tests, evaluation). runc: the host's "
                    "kernel, as Docker runs any container; runsc: gVisor, a kernel of its own between the job and "
                    "the host's (a kernel bug the agent reaches is gVisor's, not the host's); the engine must have "
                    "it registered (`executor doctor` shows how). Unset: EXECUTOR_DEFAULT_RUNTIME, fixed for the "
                    "job when it is accepted. Under runsc the network is sealed or none (gVisor is registered "
                    "with --network=none).",
    )
    egress: list[str] = Field(
        default_factory=list,
        description='What a sealed job may reach through its egress proxy: "host:port" entries, e.g. '
                    '["packages.example.com:443", "*.example.org:443"] ("*." = every subdomain). A name that '
                    "resolves to a loopback, private, link-local or metadata address is refused unless an entry "
                    "names that IP itself. Empty (default): nothing.",
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
    disallowed_tools: list[str] | None = Field(
        default=None,
        description="Tools of the agent's CLI a batch job does not get, by the CLI's own names: their definitions "
                    "ride along in every request otherwise. Unset: the agent's own headless set (subagents, web, "
                    "scheduling...); [] gives the CLI's full set.",
    )
    max_attempts: int = Field(default=4, ge=1, description="Attempts a rate-limited/overloaded job gets in all.")
    backoff_initial: Duration = Field(default=15.0, description="First wait after a rate limit.")
    backoff_multiplier: float = Field(default=2.0, ge=1, description="Each further wait is this much longer.")
    backoff_max: Duration = Field(default=900.0, description="No single wait is longer (unless the API says so).")
    cli_max_retries: int = Field(
        default=2, ge=0, le=9,
        description="The agent CLI's own quick retries of a failed API call (each CLI's own setting) before the "
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

    session_carry: tuple[str, ...] | None = Field(
        default=None,
        description="Globs of the agent's home that a committed job hands on to the next job of its session. "
                    "Unset: only the agent's conversation transcripts; hooks, settings files, shell rc files and "
                    "shell snapshots run code in the next job: name them here only if you want exactly that.")

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

    @model_validator(mode="after")
    def _runsc_has_no_network(self) -> Policy:
        if self.runtime == "runsc" and self.unsealed:
            raise ValueError(f"network = \"{self.network}\" cannot work under runtime = \"runsc\" (gVisor is "
                             "registered with --network=none, so the job would have no network at all): use "
                             "network = \"sealed\" (the API and the egress list through host sockets) or runtime "
                             "= \"runc\"")
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
    """A named way to reach a model: one agent, exactly one model, one credential, no fallback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    agent: Literal["claude-code", "codex", "gemini"] = Field(
        default="claude-code", description="The coding agent's CLI that runs the jobs.")
    model: str = Field(description="Exact model id the agent is given (no aliases).")
    auth_env: str = Field(description="Name of the executor's environment variable holding the credential.")
    auth_type: Literal["api_key", "oauth_token"] = Field(
        default="api_key",
        description="How the credential is presented: an API key, or (claude-code only) an OAuth token.",
    )
    base_url: str | None = Field(
        default=None, description="The provider's endpoint (default: its public API). codex: an OpenAI-style base "
                                  "ending in /v1.")
    max_concurrent: int | None = Field(default=None, ge=1, description="Jobs of this runner at once.")
    compaction_model: str | None = Field(
        default=None, min_length=1,
        description="The small model (a pinned id) that writes session briefs, through this runner's provider and "
                    "credential. claude-code: EXECUTOR_COMPACTION_MODEL when unset; the others: no model brief "
                    "(the structural one) when unset.")

    @model_validator(mode="after")
    def _fits_the_agent(self) -> Runner:
        if self.auth_type == "oauth_token" and self.agent != "claude-code":
            raise ValueError(f'auth_type "oauth_token" is for claude-code runners; a {self.agent} runner takes an '
                             'API key: remove auth_type (or set it to "api_key")')
        if self.agent == "codex" and self.base_url and not self.base_url.rstrip("/").endswith("/v1"):
            raise ValueError(f"a codex runner's base_url is an OpenAI-style base ending in /v1 (the CLI adds "
                             f"/responses to it): {self.base_url!r} does not end in /v1")
        return self


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
