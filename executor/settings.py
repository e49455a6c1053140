"""The executor's configuration: one ``Settings`` object read from the environment once, at start-up.

Owns every ``EXECUTOR_*`` variable and the derived paths of the state root. Everything else receives a
``Settings`` instance (or the values it needs) as an argument.

Must never: be read from anywhere but the CLI's entry point (and tests), or hold a secret's value
(runner tokens stay in the environment and are looked up by name only when a container starts).
"""

from __future__ import annotations

import difflib
import json
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from .errors import UnknownSetting

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


_AUTHOR = re.compile(r"^[ \t]*([^<>\r\n]*?)[ \t]*<([^<>\s]+)>[ \t]*$")


def parse_author(value: str) -> tuple[str, str]:
    """``Name <email>`` as (name, email); ``ValueError`` saying how to write it."""
    found = _AUTHOR.match(value or "")
    if not found or not found.group(1):
        raise ValueError(f"{value!r} is not an author: write it as Name <email>, e.g. executor <executor@host>")
    return found.group(1), found.group(2)


def default_git_author() -> str:
    return f"executor <executor@{socket.gethostname()}>"


def parse_size(value: str | int | float) -> int:
    """Bytes from ``"8g"``, ``"256m"``, ``"512MiB"`` or a plain number (Docker's size notation)."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size: use a number of bytes or e.g. '512m', '8g'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1.5h"``, ``"7d"`` or a plain number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration: use seconds or e.g. '30s', '5m', '2h', '7d'")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def format_size(n: int) -> str:
    """A size as a person would write it in a policy (``2g``), exact."""
    for unit in ("g", "m", "k"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """A measured size, rounded for reading (``1.3 GiB``)."""
    for unit, name in (("t", "TiB"), ("g", "GiB"), ("m", "MiB"), ("k", "KiB")):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {name}"
    return f"{n} B"


#: The small model's pinned id: a dated id names one model for good, where an alias moves with releases.
COMPACTION_MODEL = "claude-haiku-4-5-20251001"

#: Every kind of notification (``notify.kind_of``), and those sent unless ``EXECUTOR_NOTIFY_ON`` says otherwise:
#: every unsuccessful end, and every review.
NOTIFY_KINDS = ("review", "failed", "timeout", "rolled_back", "tests_failed", "stalled", "rejected", "cancelled",
                "succeeded")
DEFAULT_NOTIFY = ("review", "failed", "timeout", "rolled_back", "tests_failed", "stalled", "rejected")

#: Variables that compose.yaml reads on the host (image names, host directories) and that may reach the
#: executor's environment through ``.env``; they are not the executor's settings, and not errors.
DEPLOYMENT_VARIABLES = frozenset({"EXECUTOR_IMAGE", "EXECUTOR_STATE_DIR", "EXECUTOR_WORKSPACES_DIR",
                                  "EXECUTOR_POLICIES_DIR", "EXECUTOR_POSTGRES_IMAGE", "EXECUTOR_POSTGRES_DATA"})


class _StrictEnvironment(EnvSettingsSource):
    """The environment, refusing ``EXECUTOR_*`` variables that name no setting (with the closest one)."""

    def __call__(self) -> dict:
        known = {f"EXECUTOR_{name}".upper() for name in self.settings_cls.model_fields} | DEPLOYMENT_VARIABLES
        unknown = sorted(k.upper() for k in self.env_vars if k.upper().startswith("EXECUTOR_")
                         and k.upper() not in known)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
            raise UnknownSetting(f"unknown setting {', '.join(hints)}: the EXECUTOR_* settings are listed in the "
                                 "README's Settings table")
        return super().__call__()


class Settings(BaseSettings):
    """Settings of one executor. Each field is ``EXECUTOR_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="EXECUTOR_", extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, _StrictEnvironment(settings_cls), dotenv_settings, file_secret_settings

    home: Path = Field(default=Path("store"), description="State root: executor.db, spool/, jobs/.")
    policies: Path = Field(default=Path("policies"), description="Directory of policy and runner TOML files.")
    workspace_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories a job's workspace must lie under (absolute; separated by ':' or ',', or a "
                    "JSON list).",
    )
    sandbox_image: str = Field(default="executor-sandbox:latest", description="Image every job runs in.")
    budget_cpus: float = Field(default=4.0, gt=0, description="CPU cores all job containers may use together.")
    budget_memory: Annotated[int, NoDecode] = Field(default=parse_size("8g"), description="Memory budget.")
    reserve_memory: Annotated[int, NoDecode] = Field(
        default=parse_size("256m"), description="Part of the memory budget kept for the executor itself."
    )
    disk_reserve: Annotated[int, NoDecode] = Field(
        default=parse_size("5g"),
        description="Free space under the state root that jobs may not take: none starts below it, and when "
                    "running jobs push it below, the one that wrote the most is stopped (disk_reserve).")
    gateway_connections: int = Field(
        default=8, ge=1, le=1024,
        description="Connections a sealed job may have open to its API gateway at once; the next ones wait, not "
                    "accepted, until one closes.")
    egress_connections: int = Field(
        default=8, ge=1, le=1024,
        description="Connections a sealed job may have open to its egress proxy at once; the next ones wait, not "
                    "accepted, until one closes.")
    gateway_parse_memory: Annotated[int, NoDecode] = Field(
        default=parse_size("96m"), ge=parse_size("1m"),
        description="Memory the strict parse of one request body may need, estimated before it starts (one body at "
                    "a time for all jobs); a body whose parse could need more is refused 413.")
    sealed_event_cap: int = Field(
        default=200, ge=1,
        description="Events of a sealed attempt's gateway refusals and egress decisions (identical ones are one "
                    "event with a count); past it, only counts, in one more event.")
    default_runtime: Literal["runc", "runsc"] = Field(
        default="runc",
        description="The OCI runtime of a job whose policy names none (runc: the host's kernel; runsc: gVisor). "
                    "Fixed for each job when it is accepted.")
    disk_cap: Literal["auto", "image", "watchdog"] = Field(
        default="auto",
        description="How a policy's disk holds. image: each job's layers are an ext4 image of that size (the "
                    "writer gets ENOSPC at the cap; needs root, CAP_SYS_ADMIN, loop devices and mkfs.ext4, and "
                    "refuses to start without them); watchdog: the layers are measured every few seconds; auto: "
                    "image where the host allows it, else watchdog (`executor doctor` says which and why).")
    poll_interval: float = Field(
        default=0.5, gt=0,
        description="Seconds between rounds of the serving loop while it has work in hand (an idle loop waits up "
                    "to 5 s; new work wakes it at once).")
    result_grace: float = Field(
        default=10.0, ge=0, description="Seconds the CLI may linger after its result line before it is stopped."
    )
    retention: float = Field(
        default=7 * 86400.0, gt=0,
        description="Seconds a kept upper dir (conflict, review) stays before it is removed (default 7 days).",
    )
    compaction_model: str = Field(
        default=COMPACTION_MODEL, min_length=1,
        description="Pinned model id (a dated id, not an alias) of the small model that writes session briefs; "
                    "it is called through the job's runner (its base_url and credential).")
    compaction_attempts: int = Field(default=4, ge=1, description="Calls per summary on 429/529 before giving up.")
    compaction_backoff: float = Field(default=2.0, gt=0, description="First wait (s) after a 429/529; doubles.")
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    ui_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Port of the review web page served by `executor serve` (unset: no web page).")
    ui_host: str = Field(default="127.0.0.1", description="Address the web page binds to.")
    ui_token: SecretStr | None = Field(
        default=None,
        description="Token the web page requires (Authorization: Bearer, or ?token= once in a browser). "
                    "Required when ui_host is not a loopback address: without it such a page refuses everything.")
    notify_url: SecretStr | None = Field(
        default=None, description="Receives a JSON POST when a job ends unsuccessfully or waits for review "
                                  "(ntfy, chat webhooks).")
    notify_on: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_NOTIFY),
        description="Kinds of notification (comma-separated): review, failed, timeout, rolled_back, tests_failed, "
                    "stalled, rejected, cancelled, succeeded.")
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="Port of the Prometheus /metrics endpoint (off when unset).")
    metrics_host: str = Field(default="127.0.0.1", description="Address the metrics endpoint listens on.")
    database_url: SecretStr | None = Field(
        default=None,
        description="The store: unset, the SQLite file executor.db under the state root; a postgresql+psycopg:// "
                    "URL makes several hosts share one PostgreSQL queue (its password is redacted like a token).")
    host_id: str = Field(
        default_factory=socket.gethostname, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="This host's name in the shared store (default: the hostname); unique per `executor serve`.")
    host_heartbeat: float = Field(default=5.0, gt=0, description="Seconds between two heartbeats of this host.")
    host_timeout: float = Field(
        default=60.0, gt=0,
        description="A host whose last heartbeat is older than this is lost: its running jobs are marked "
                    "interrupted, and a host holding the same workspace root rolls them back and re-queues them.")
    claim_poll: float = Field(
        default=5.0, gt=0,
        description="Seconds an idle host waits for new work to be announced (a NOTIFY, or the SQLite store's "
                    "wake file) before it looks at the queue anyway.")
    git_author: str = Field(
        default_factory=default_git_author,
        description="Author and committer (Name <email>) of the commits a job's change lands as (policy land = "
                    "\"commit\" or \"branch\"); default executor <executor@HOSTNAME>.")

    @field_validator("git_author")
    @classmethod
    def _author(cls, value: str) -> str:
        parse_author(value)
        return value.strip()

    @field_validator("workspace_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{value!r} looks like a JSON list but is not one ({exc.msg}); write "
                                 '["/srv/repos", "/home/me/code"] or /srv/repos:/home/me/code') from None
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ValueError("a JSON list of workspace roots must hold strings (absolute paths)")
            return value
        if isinstance(value, str):
            return [p.strip() for p in re.split(r"[:,]", value) if p.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _known_engine(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("EXECUTOR_DATABASE_URL must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

    @field_validator("notify_on", mode="before")
    @classmethod
    def _kinds(cls, value: object) -> object:
        kinds = [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value
        unknown = [k for k in kinds if k not in NOTIFY_KINDS]
        if unknown:
            raise ValueError(f"unknown kind {', '.join(unknown)}: choose among {', '.join(NOTIFY_KINDS)}")
        return kinds

    @field_validator("retention", "host_heartbeat", "host_timeout", "claim_poll", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("budget_memory", "reserve_memory", "disk_reserve", "gateway_parse_memory", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if isinstance(value, (str, int, float)):
            return parse_size(value)
        return value

    @field_validator("home", "policies")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("workspace_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        relative = [str(p) for p in value if not p.expanduser().is_absolute()]
        if relative:
            raise ValueError(f"workspace roots must be absolute paths, not {', '.join(relative)}")
        return [p.expanduser().resolve() for p in value]

    # Derived paths of the state root: one place, so no module builds them by hand.
    @property
    def db_path(self) -> Path:
        return self.home / "executor.db"

    @property
    def db_url(self) -> str:
        """The store's URL: ``EXECUTOR_DATABASE_URL``, or the SQLite file under the state root."""
        return self.database_url.get_secret_value() if self.database_url is not None else f"sqlite:///{self.db_path}"

    @property
    def store_exists(self) -> bool:
        """Whether there is a store to open: a database URL names one, or the SQLite file is there."""
        return self.database_url is not None or self.db_path.exists()

    @property
    def shared_store(self) -> bool:
        """Whether the store is a PostgreSQL database other hosts may share."""
        return self.db_url.startswith("postgresql")

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def reviews_dir(self) -> Path:
        """The diffs kept for decided reviews (``review/kept.py``)."""
        return self.home / "reviews"

    @property
    def sessions_dir(self) -> Path:
        return self.home / "sessions"

    @property
    def status_path(self) -> Path:
        return self.home / "status.json"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    @property
    def evaluation_dir(self) -> Path:
        """The graded gate's cache of *before* runs, per repository state."""
        return self.home / "evaluation"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id
