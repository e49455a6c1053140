"""What a job file may say, and the checks that make a job runnable before it is accepted.

Owns the job file schema (``JobSpec``) and its validation against the settings, the runners and the
policies: every problem is an ``InvalidJob`` whose message says what is wrong and how to fix it. A policy
that lands the change in git (``land = "commit"`` or ``"branch"``) needs a git repository, and ``commit`` one
on a branch with no merge or rebase underway: git is asked (read only, as the repository's owner).

Must never: touch the spool, the database or Docker, or run git but as the repository's owner; it only judges.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError, GitError, InvalidJob
from ..policy import Policy, Runner, load_policy, load_runners
from ..settings import Settings, format_size
from ..transaction.git import Git
from ..transaction.landing import branch_of, check_head
from ..transaction.safefs import Identity
from ..transaction.workspace import open_beneath_root, open_identity, root_of

# First character alphanumeric: "." and ".." would name the jobs directory or the state root itself as a
# job's directory (removed on rollback), and a leading "-" reads as an option on the command line.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The overlay's mount options are a comma-separated list and lowerdir stacks are colon-separated.
_UNSAFE_PATH_CHARS = set(",:\n\\")


class JobSpec(BaseModel):
    """A job file (JSON). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")

    runner: str = Field(description="Name of a runner in runners.toml.")
    workspace: str = Field(description="Absolute path of the repository, under a workspace root.")
    prompt: str = Field(min_length=1, description="What the agent is asked to do.")
    id: str | None = Field(default=None, pattern=JOB_ID.pattern, description="Unique job id.")
    session_id: str | None = Field(default=None, pattern=JOB_ID.pattern, description="Defaults to the id.")
    policy: str = Field(default="default", description="Policy file name (without .toml).")
    test_command: str | None = Field(default=None, min_length=1, description="Overrides the policy's.")
    priority: int = Field(default=0, description="Higher starts first; ties start in arrival order.")
    skills: list[str] | None = Field(default=None, description="Skills (policies/skills/NAME.md) that ride "
                                     "along in full in the session brief.")
    context: Literal["full"] | None = Field(default=None, description="'full': bypass compaction for this job.")
    follows: str | None = Field(default=None, pattern=JOB_ID.pattern,
                                description="The job this one retries (`executor retry` sets it; shown with both).")


@dataclass(frozen=True)
class ValidJob:
    """A job that passed every check, with what it resolved to."""

    spec: JobSpec
    id: str
    runner: Runner
    policy: Policy
    workspace: Path
    identity: Identity  # the repository directory as intake found it: device, inode, owner

    @property
    def owner_uid(self) -> int:
        return self.identity.uid

    @property
    def owner_gid(self) -> int:
        return self.identity.gid

    @property
    def session_id(self) -> str:
        return self.spec.session_id or self.id

    @property
    def test_command(self) -> str | None:
        return self.spec.test_command or self.policy.test_command


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def parse_spec(raw: bytes | str | dict) -> JobSpec:
    """Decode and schema-check a job file's content."""
    if isinstance(raw, (bytes, str)):
        try:
            return JobSpec.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidJob(_explain(exc)) from None
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidJob(_explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            parts.append(f"not valid JSON ({err['ctx'].get('error', err['msg'])}): write one JSON object")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}: allowed fields are {', '.join(JobSpec.model_fields)}")
        elif err["type"] == "missing":
            parts.append(f"missing required field {where!r}")
        elif err["type"] == "model_type":
            parts.append("a job file must be one JSON object")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "invalid job file: " + "; ".join(parts)


def validate(spec: JobSpec, settings: Settings, runners: dict[str, Runner] | None = None) -> ValidJob:
    """Every check a job must pass before it is accepted; raises InvalidJob naming the problem."""
    if runners is None:
        runners = _runners(settings)
    runner = runners.get(spec.runner)
    if runner is None:
        known = ", ".join(sorted(runners)) or "none"
        raise InvalidJob(
            f"unknown runner {spec.runner!r}: runners in {settings.policies / 'runners.toml'} are {known}"
        )
    try:
        policy = load_policy(settings.policies, spec.policy)
    except ConfigError as exc:
        raise InvalidJob(f"policy {spec.policy!r}: {exc}") from None
    policy = _with_runtime(policy, spec.policy, settings)
    _check_budget(policy, settings)
    _check_skills(spec.skills or [], settings)
    workspace, identity = _check_workspace(spec.workspace, settings)
    job_id = spec.id or new_job_id()
    _check_git(spec.policy, policy, job_id, workspace, identity, settings)
    return ValidJob(spec=spec, id=job_id, runner=runner, policy=policy, workspace=workspace, identity=identity)


def _check_git(name: str, policy: Policy, job_id: str, workspace: Path, identity: Identity,
               settings: Settings) -> None:
    """A policy that lands the change in git needs a repository git can land it in (see the docstring)."""
    if policy.land == "files":
        return
    if policy.land == "branch" and (".." in job_id or job_id.endswith((".", ".lock"))):
        raise InvalidJob(f"job id {job_id!r} cannot name the branch {branch_of(job_id)} (policy {name!r} has "
                         "land = \"branch\"): give an id without '..', a trailing '.' or '.lock'")
    if os.geteuid() not in (0, identity.uid):
        return  # git cannot run as the owner here: the serving executor's intake asks it
    root = root_of(settings.workspace_roots, workspace)
    try:
        fd = open_beneath_root(root, workspace)
    except OSError as exc:
        raise InvalidJob(f"workspace {workspace} cannot be opened: {exc.strerror}") from None
    try:
        git = Git(fd, identity.uid, identity.gid)
        check_head(git, policy.land, workspace)
        if policy.land == "branch" and git.rev("refs/heads/" + branch_of(job_id)) is not None:
            raise GitError(f"a branch {branch_of(job_id)} exists already in {workspace}: delete or rename it, or give "
                           "the job another id (a job never moves a branch it did not make)")
    except GitError as exc:
        raise InvalidJob(f"policy {name!r} has land = \"{policy.land}\", but {exc}") from None
    finally:
        os.close(fd)


def _with_runtime(policy: Policy, name: str, settings: Settings) -> Policy:
    """The policy with its runtime fixed (EXECUTOR_DEFAULT_RUNTIME where it names none): a later change of the
    default never moves an accepted job to another kernel."""
    if policy.runtime is not None:
        return policy
    try:
        return Policy(**{**policy.model_dump(), "runtime": settings.default_runtime})
    except ValueError as exc:
        raise InvalidJob(f"policy {name!r} under EXECUTOR_DEFAULT_RUNTIME={settings.default_runtime}: "
                         f"{_first_error(exc)}") from None


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)).removeprefix("Value error, ") for e in errors())
    return str(exc)


def _runners(settings: Settings) -> dict[str, Runner]:
    try:
        return load_runners(settings.policies)
    except ConfigError as exc:
        raise InvalidJob(f"cannot read runners: {exc}") from None


SKILL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_skills(skills: list[str], settings: Settings) -> None:
    for name in skills:
        if not SKILL_NAME.match(name):
            raise InvalidJob(f"skill {name!r} is not a skill name (letters, digits, . _ -)")
        if not (settings.policies / "skills" / f"{name}.md").is_file():
            raise InvalidJob(f"unknown skill {name!r}: there is no {settings.policies / 'skills' / (name + '.md')}")


def _check_budget(policy: Policy, settings: Settings) -> None:
    usable_memory = settings.budget_memory - settings.reserve_memory
    if policy.cpus > settings.budget_cpus:
        raise InvalidJob(
            f"policy asks for {policy.cpus:g} cpus but the whole budget is {settings.budget_cpus:g} "
            "(EXECUTOR_BUDGET_CPUS): lower the policy's cpus or raise the budget"
        )
    if policy.memory > usable_memory:
        raise InvalidJob(
            f"policy asks for {format_size(policy.memory)} of memory but the budget leaves "
            f"{format_size(usable_memory)} for jobs (EXECUTOR_BUDGET_MEMORY "
            f"{format_size(settings.budget_memory)} minus EXECUTOR_RESERVE_MEMORY "
            f"{format_size(settings.reserve_memory)}): lower the policy's memory or raise the budget"
        )


def _check_workspace(raw: str, settings: Settings) -> tuple[Path, Identity]:
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidJob(f"workspace {raw!r} is not an absolute path")
    if _UNSAFE_PATH_CHARS & set(raw):
        raise InvalidJob(f"workspace {raw!r} contains one of , : \\ or a newline, which overlay options cannot carry")
    path = Path(os.path.normpath(raw))
    root = root_of(settings.workspace_roots, path)
    if root is None:
        roots = ", ".join(str(r) for r in settings.workspace_roots) or "none configured"
        real = path.resolve()
        if root_of(settings.workspace_roots, real) is not None:
            raise InvalidJob(f"workspace {raw!r} reaches its workspace root through a symlink; give its real path "
                             f"{str(real)!r}")
        raise InvalidJob(
            f"workspace {raw!r} is not under a workspace root ({roots}); move the repository under one, or add "
            "its parent to EXECUTOR_WORKSPACE_ROOTS (with compose, which sets that itself: put the repository "
            "under EXECUTOR_WORKSPACES_DIR, the host directory mounted at the root, ./workspaces by default)"
        )
    try:
        identity = open_identity(root, path)
    except FileNotFoundError:
        raise InvalidJob(f"workspace {raw!r} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidJob(f"workspace {raw!r} is not a directory reached without symlinks from its workspace "
                             f"root {str(root)!r} (a symlink or a file on the path): give the repository's real "
                             "path") from None
        raise InvalidJob(f"workspace {raw!r} cannot be opened: {exc.strerror}") from None
    if identity.uid == 0:
        raise InvalidJob(
            f"workspace {raw!r} is owned by root; the agent runs as the repository's owner and never as "
            "root: chown the repository to a regular user"
        )
    return path, identity
