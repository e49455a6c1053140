"""Tests for executor.policy (policy and runner TOML), executor.jobs (job file schema and validation)
and executor.settings (EXECUTOR_* environment variables)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from executor.agent.claude_code.command import auth_var
from executor.errors import ConfigError, InvalidJob
from executor.intake.jobs import JobSpec, parse_spec, validate
from executor.policy import load_policy, load_runners, parse_duration
from executor.settings import Settings, parse_size
from tests.conftest import chown_tree

GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------------------------------------
# helpers


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def spec(**fields) -> JobSpec:
    fields.setdefault("runner", "scripted")
    fields.setdefault("prompt", "do the thing")
    return parse_spec(json.dumps(fields).encode())


def invalid(spec_or_raw, settings: Settings | None = None) -> str:
    """The InvalidJob message of parsing (and, given settings, validating) a job."""
    with pytest.raises(InvalidJob) as info:
        parsed = spec_or_raw if isinstance(spec_or_raw, JobSpec) else parse_spec(spec_or_raw)
        if settings is None:
            pytest.fail("parse_spec accepted the job")
        validate(parsed, settings)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# sizes and durations


@pytest.mark.parametrize("text,expected", [
    ("512m", 512 * MIB), ("2g", 2 * GIB), ("2G", 2 * GIB), ("256MiB", 256 * MIB), ("1.5g", int(1.5 * GIB)),
    ("1024", 1024), ("64k", 64 * 1024), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 x", "-1g", "1gg"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text,expected", [
    ("30s", 30.0), ("5m", 300.0), ("1.5h", 5400.0), ("2d", 172800.0), ("250ms", 0.25), ("45", 45.0),
    (90, 90.0), (2.5, 2.5),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-3s", "1w"])
def test_parse_duration_refuses_garbage(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# ---------------------------------------------------------------------------------------------
# policy files


def test_policy_file_sizes_and_durations(tmp_path):
    write(tmp_path / "big.toml", 'cpus = 2.5\nmemory = "512m"\npids = 64\ntimeout = "1.5h"\n'
                                 'test_timeout = "30s"\nnetwork = "none"\ntest_command = "make test"\n')
    policy = load_policy(tmp_path, "big")
    assert policy.cpus == 2.5
    assert policy.memory == 512 * MIB
    assert policy.pids == 64
    assert policy.timeout == 5400.0
    assert policy.test_timeout == 30.0
    assert policy.network == "none"
    assert policy.test_command == "make test"


def test_policy_numbers_and_defaults(tmp_path):
    write(tmp_path / "p.toml", 'memory = "2g"\ntimeout = 120\ntest_timeout = "5m"\n')
    policy = load_policy(tmp_path, "p")
    assert policy.memory == 2 * GIB
    assert policy.timeout == 120.0
    assert policy.test_timeout == 300.0
    # what the file does not name keeps its default
    assert policy.cpus == 1.0 and policy.network == "sealed" and policy.egress == [] and policy.test_command is None


def test_empty_policy_file_is_all_defaults(tmp_path):
    write(tmp_path / "empty.toml", "")
    policy = load_policy(tmp_path, "empty")
    assert policy.memory == 2 * GIB and policy.timeout == 1800.0 and policy.pids == 512


def test_policy_unknown_key_is_named(tmp_path):
    write(tmp_path / "p.toml", 'cpus = 1\nmemroy = "1g"\n')
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path, "p")
    message = str(info.value)
    assert "memroy" in message
    assert str(tmp_path / "p.toml") in message


def test_policy_bad_network(tmp_path):
    write(tmp_path / "p.toml", 'network = "internet"\n')
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path, "p")
    assert "network" in str(info.value)
    assert "bridge" in str(info.value)  # says what the allowed values are


@pytest.mark.parametrize("line,field", [
    ('memory = "lots"', "memory"), ('timeout = "soon"', "timeout"), ("timeout = 0", "timeout"),
    ("cpus = 0", "cpus"), ("pids = 2", "pids"), ('test_timeout = "-5s"', "test_timeout"),
])
def test_policy_bad_values_name_the_field(tmp_path, line, field):
    write(tmp_path / "p.toml", line + "\n")
    with pytest.raises(ConfigError, match=field):
        load_policy(tmp_path, "p")


def test_policy_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path, "nope")
    assert "does not exist" in str(info.value)
    assert str(tmp_path / "nope.toml") in str(info.value)


def test_policy_invalid_toml(tmp_path):
    write(tmp_path / "p.toml", "cpus = = 2\n")
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path, "p")
    assert "not valid TOML" in str(info.value)


@pytest.mark.parametrize("name", ["runners", "../etc/passwd", "a/b", "", "x" * 65])
def test_policy_name_must_be_a_plain_file_name(tmp_path, name):
    write(tmp_path / "runners.toml", "")
    with pytest.raises(ConfigError, match="not a policy file name"):
        load_policy(tmp_path, name)


# ---------------------------------------------------------------------------------------------
# runners.toml


def test_runners_parsed(tmp_path):
    write(tmp_path / "runners.toml", """
[runners.fast]
model = "claude-sonnet-4-5"
auth_env = "FAST_KEY"
base_url = "http://127.0.0.1:8080"
max_concurrent = 2

[runners.sub]
model = "claude-opus-4-1"
auth_env = "SUB_TOKEN"
auth_type = "oauth_token"
""")
    runners = load_runners(tmp_path)
    assert sorted(runners) == ["fast", "sub"]
    fast, sub = runners["fast"], runners["sub"]
    assert fast.name == "fast" and fast.model == "claude-sonnet-4-5" and fast.auth_env == "FAST_KEY"
    assert fast.base_url == "http://127.0.0.1:8080" and fast.max_concurrent == 2
    assert fast.auth_type == "api_key"
    assert auth_var(fast) == "ANTHROPIC_API_KEY"
    assert sub.auth_type == "oauth_token"
    assert auth_var(sub) == "CLAUDE_CODE_OAUTH_TOKEN"
    assert sub.base_url is None and sub.max_concurrent is None


def test_runner_unknown_key_is_named(tmp_path):
    write(tmp_path / "runners.toml", '[runners.a]\nmodel = "m"\nauth_env = "K"\nfallback_model = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_runners(tmp_path)
    assert "fallback_model" in str(info.value)


def test_runners_unknown_top_level_key(tmp_path):
    write(tmp_path / "runners.toml", 'default = "a"\n[runners.a]\nmodel = "m"\nauth_env = "K"\n')
    with pytest.raises(ConfigError) as info:
        load_runners(tmp_path)
    assert "default" in str(info.value) and "top-level" in str(info.value)


def test_runner_bad_auth_type(tmp_path):
    write(tmp_path / "runners.toml", '[runners.a]\nmodel = "m"\nauth_env = "K"\nauth_type = "password"\n')
    with pytest.raises(ConfigError, match="auth_type"):
        load_runners(tmp_path)


def test_runner_missing_model(tmp_path):
    write(tmp_path / "runners.toml", '[runners.a]\nauth_env = "K"\n')
    with pytest.raises(ConfigError, match="model"):
        load_runners(tmp_path)


def test_runner_not_a_table(tmp_path):
    write(tmp_path / "runners.toml", '[runners]\na = "claude"\n')
    with pytest.raises(ConfigError, match="must be a table"):
        load_runners(tmp_path)


def test_runners_missing_and_invalid(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_runners(tmp_path)
    write(tmp_path / "runners.toml", "[runners.a\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_runners(tmp_path)


# ---------------------------------------------------------------------------------------------
# job file schema


def test_job_spec_parsed_with_defaults():
    job = parse_spec(b'{"runner": "r", "workspace": "/w", "prompt": "p"}')
    assert (job.runner, job.workspace, job.prompt) == ("r", "/w", "p")
    assert job.id is None and job.session_id is None
    assert job.policy == "default" and job.priority == 0 and job.test_command is None


def test_job_spec_from_dict():
    job = parse_spec({"runner": "r", "workspace": "/w", "prompt": "p", "id": "job-1", "priority": 5})
    assert job.id == "job-1" and job.priority == 5
    with pytest.raises(InvalidJob, match="missing required field 'prompt'"):
        parse_spec({"runner": "r", "workspace": "/w"})


def test_job_missing_field():
    message = invalid(b'{"runner": "r", "prompt": "p"}')
    assert "missing required field 'workspace'" in message


def test_job_unknown_field_lists_the_allowed_ones():
    message = invalid(b'{"runner": "r", "workspace": "/w", "prompt": "p", "model": "opus"}')
    assert "unknown field 'model'" in message
    for allowed in ("runner", "workspace", "prompt", "id", "session_id", "policy", "test_command", "priority"):
        assert allowed in message


@pytest.mark.parametrize("raw", [b'{"runner": "r",', b"", b"runner=r", b"\xff\xfe{}"])
def test_job_malformed_json(raw):
    assert "not valid JSON" in invalid(raw)


@pytest.mark.parametrize("raw", [b"[]", b'"job"', b"42", b"null", b'[{"runner": "r"}]'])
def test_job_not_an_object(raw):
    assert "must be one JSON object" in invalid(raw)


@pytest.mark.parametrize("bad", ["a b", "a/b", "../x", "", "x" * 65, "é", "a\nb", ".", "..", "-rf", ".hidden"])
def test_job_bad_id(bad):
    message = invalid(json.dumps({"runner": "r", "workspace": "/w", "prompt": "p", "id": bad}).encode())
    assert "id" in message


@pytest.mark.parametrize("bad", ["a b", "../x", ".."])
def test_job_bad_session_id(bad):
    message = invalid(json.dumps({"runner": "r", "workspace": "/w", "prompt": "p", "session_id": bad}).encode())
    assert "session_id" in message


@pytest.mark.parametrize("good", ["a", "job-1", "Job_2.retry", "x" * 64, "0"])
def test_job_good_ids(good):
    assert parse_spec({"runner": "r", "workspace": "/w", "prompt": "p", "id": good}).id == good


def test_job_empty_prompt_refused():
    assert "prompt" in invalid(b'{"runner": "r", "workspace": "/w", "prompt": ""}')


# ---------------------------------------------------------------------------------------------
# validate: runner, policy, budget, workspace


def test_validate_good_job(world):
    repo = world.repo("app")
    valid = validate(spec(workspace=str(repo), id="j1", session_id="s1"), world.settings())
    assert valid.id == "j1" and valid.session_id == "s1"
    assert valid.runner.name == "scripted"
    assert valid.workspace == repo.resolve()
    assert valid.owner_uid == 1000 and valid.owner_gid == 1000
    assert valid.policy.memory == GIB  # world's default policy says "1g"
    assert valid.test_command == "true"  # the policy's


def test_validate_generates_id_and_session_defaults_to_it(world):
    repo = world.repo("app")
    a = validate(spec(workspace=str(repo)), world.settings())
    b = validate(spec(workspace=str(repo)), world.settings())
    assert a.id and b.id and a.id != b.id
    assert a.session_id == a.id


def test_validate_job_test_command_overrides_policy(world):
    repo = world.repo("app")
    valid = validate(spec(workspace=str(repo), test_command="pytest -q"), world.settings())
    assert valid.test_command == "pytest -q"


def test_validate_unknown_runner_lists_known_ones(world):
    repo = world.repo("app")
    world.write_runners(world.base_url, models={"alpha": "claude-sonnet-4-5", "beta": "claude-opus-4-1"})
    message = invalid(spec(runner="gamma", workspace=str(repo)), world.settings())
    assert "unknown runner 'gamma'" in message
    assert "alpha, beta" in message


def test_validate_unknown_policy(world):
    repo = world.repo("app")
    message = invalid(spec(workspace=str(repo), policy="turbo"), world.settings())
    assert "turbo" in message and "does not exist" in message


def test_validate_policy_with_bad_content(world):
    repo = world.repo("app")
    write(world.policies / "broken.toml", "speed = 11\n")
    message = invalid(spec(workspace=str(repo), policy="broken"), world.settings())
    assert "speed" in message


def test_validate_unreadable_runners_file(world):
    repo = world.repo("app")
    write(world.policies / "runners.toml", "[runners.x]\nmodel = 'm'\n")  # auth_env missing
    message = invalid(spec(workspace=str(repo)), world.settings())
    assert "cannot read runners" in message and "auth_env" in message


def test_validate_policy_over_cpu_budget(world):
    repo = world.repo("app")
    world.write_policy("wide", cpus=6)
    message = invalid(spec(workspace=str(repo), policy="wide"), world.settings(budget_cpus=4))
    assert "6 cpus" in message and "budget is 4" in message
    assert "EXECUTOR_BUDGET_CPUS" in message


def test_validate_policy_over_memory_budget(world):
    repo = world.repo("app")
    world.write_policy("fat", memory="8g")
    message = invalid(spec(workspace=str(repo), policy="fat"),
                      world.settings(budget_memory="8g", reserve_memory="256m"))
    assert "8g of memory" in message
    assert "7936m" in message  # what is left for jobs: 8g - 256m
    assert "EXECUTOR_BUDGET_MEMORY 8g" in message
    assert "EXECUTOR_RESERVE_MEMORY 256m" in message


def test_validate_policy_exactly_at_budget_is_fine(world):
    repo = world.repo("app")
    world.write_policy("edge", cpus=4, memory="3840m")
    valid = validate(spec(workspace=str(repo), policy="edge"),
                     world.settings(budget_cpus=4, budget_memory="4g", reserve_memory="256m"))
    assert valid.policy.cpus == 4 and valid.policy.memory == 3840 * MIB


def test_validate_workspace_relative(world):
    world.repo("app")
    message = invalid(spec(workspace="repos/app"), world.settings())
    assert "not an absolute path" in message


def test_validate_workspace_missing(world):
    message = invalid(spec(workspace=str(world.repos / "ghost")), world.settings())
    assert "does not exist" in message


def test_validate_workspace_not_a_dir(world):
    path = world.repos / "file.txt"
    path.write_text("x")
    os.chown(path, 1000, 1000)
    message = invalid(spec(workspace=str(path)), world.settings())
    assert "is not a directory" in message


def test_validate_workspace_outside_roots(world, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.chown(outside, 1000, 1000)
    message = invalid(spec(workspace=str(outside)), world.settings())
    assert "not under a workspace root" in message
    assert str(world.repos) in message and "EXECUTOR_WORKSPACE_ROOTS" in message
    assert "with compose" in message and "EXECUTOR_WORKSPACES_DIR" in message  # compose sets the roots itself


def test_validate_workspace_dotdot_escape(world, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.chown(outside, 1000, 1000)
    message = invalid(spec(workspace=f"{world.repos}/../../elsewhere"), world.settings())
    assert "not under a workspace root" in message


def test_validate_workspace_symlink_out_of_roots(world, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.chown(outside, 1000, 1000)
    (world.repos / "link").symlink_to(outside)
    message = invalid(spec(workspace=str(world.repos / "link")), world.settings())
    assert "without symlinks" in message and "real path" in message


def test_validate_workspace_no_roots_configured(world):
    repo = world.repo("app")
    message = invalid(spec(workspace=str(repo)), world.settings(workspace_roots=[]))
    assert "none configured" in message


def test_validate_workspace_owned_by_root(world):
    path = world.repos / "rooty"
    path.mkdir()
    assert path.stat().st_uid == 0
    message = invalid(spec(workspace=str(path)), world.settings())
    assert "owned by root" in message


@pytest.mark.parametrize("name", ["a,b", "a:b"])
def test_validate_workspace_with_overlay_separators(world, name):
    repo = world.repo(name)
    message = invalid(spec(workspace=str(repo)), world.settings())
    assert "contains one of , :" in message


@pytest.mark.parametrize("name", ["x,y", "x:y"])
def test_validate_workspace_symlink_to_path_with_overlay_separators(world, name):
    """A symlink cannot smuggle the overlay's separators in: a workspace reached through one is refused."""
    target = world.repo(name)
    (world.repos / "plain").symlink_to(target)
    message = invalid(spec(workspace=str(world.repos / "plain")), world.settings())
    assert "without symlinks" in message


# ---------------------------------------------------------------------------------------------
# Settings from the environment


def _clear_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("EXECUTOR_"):
            monkeypatch.delenv(key)


def test_settings_defaults(monkeypatch, tmp_path):
    _clear_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.home == tmp_path / "store" and s.policies == tmp_path / "policies"
    assert s.workspace_roots == []
    assert s.budget_memory == 8 * GIB and s.reserve_memory == 256 * MIB
    assert s.budget_cpus == 4.0
    assert s.db_path == tmp_path / "store" / "executor.db"
    assert s.spool_dir == tmp_path / "store" / "spool"
    assert s.job_dir("j1") == tmp_path / "store" / "jobs" / "j1"


@pytest.mark.parametrize("sep", [":", ","])
def test_settings_workspace_roots(monkeypatch, tmp_path, sep):
    _clear_env(monkeypatch)
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("EXECUTOR_WORKSPACE_ROOTS", f"{a}{sep}{b}")
    assert Settings().workspace_roots == [a, b]


def test_settings_workspace_roots_are_resolved_and_blanks_dropped(monkeypatch, tmp_path):
    _clear_env(monkeypatch)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("EXECUTOR_WORKSPACE_ROOTS", f"{tmp_path}/link,, :{tmp_path}/x/../y")
    assert Settings().workspace_roots == [tmp_path / "real", tmp_path / "y"]


def test_settings_sizes_from_env(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_BUDGET_MEMORY", "8g")
    monkeypatch.setenv("EXECUTOR_RESERVE_MEMORY", "512m")
    monkeypatch.setenv("EXECUTOR_BUDGET_CPUS", "2.5")
    s = Settings()
    assert s.budget_memory == 8 * 1024**3 == 8589934592
    assert s.reserve_memory == 512 * MIB
    assert s.budget_cpus == 2.5


def test_settings_plain_byte_count(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_BUDGET_MEMORY", "1073741824")
    assert Settings().budget_memory == GIB


def test_settings_paths_from_env(monkeypatch, tmp_path):
    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("EXECUTOR_POLICIES", str(tmp_path / "p"))
    monkeypatch.setenv("EXECUTOR_LOG_FORMAT", "json")
    s = Settings()
    assert s.home == tmp_path / "h" and s.policies == tmp_path / "p"
    assert s.db_path == tmp_path / "h" / "executor.db"
    assert s.log_format == "json"


@pytest.mark.parametrize("var,value", [
    ("EXECUTOR_BUDGET_MEMORY", "plenty"), ("EXECUTOR_BUDGET_CPUS", "0"), ("EXECUTOR_LOG_FORMAT", "xml"),
    ("EXECUTOR_POLL_INTERVAL", "-1"),
])
def test_settings_bad_values(monkeypatch, var, value):
    from pydantic import ValidationError

    _clear_env(monkeypatch)
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_a_policy_with_a_bad_egress_entry_is_rejected_at_intake_with_the_fix(tmp_path):
    policies, repos = tmp_path / "policies", tmp_path / "repos"
    (repos / "r").mkdir(parents=True)
    chown_tree(repos)
    policies.mkdir()
    (policies / "runners.toml").write_text('[runners.r]\nmodel = "m"\nauth_env = "X"\n')
    (policies / "default.toml").write_text('egress = ["packages.example.com"]\n')
    (policies / "open.toml").write_text('network = "bridge"\negress = ["packages.example.com:443"]\n')
    (policies / "good.toml").write_text('egress = ["packages.example.com:443", "*.example.org:443"]\n')
    settings = Settings(home=tmp_path / "home", policies=policies, workspace_roots=[repos])
    job = {"runner": "r", "workspace": str(repos / "r"), "prompt": "p"}
    with pytest.raises(InvalidJob, match=r"egress.*'packages.example.com' has no port; add it, e.g. \"packages.example.com:443\""):
        validate(parse_spec(job), settings)
    with pytest.raises(InvalidJob, match='egress is enforced only for network = "sealed".*set network = "sealed"'):
        validate(parse_spec({**job, "policy": "open"}), settings)
    valid = validate(parse_spec({**job, "policy": "good"}), settings)
    assert valid.policy.sealed and valid.policy.egress == ["packages.example.com:443", "*.example.org:443"]


def test_compaction_settings_that_were_removed_are_unknown_settings(monkeypatch):
    from executor.errors import UnknownSetting

    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_COMPACTION_BASE_URL", "https://example.invalid")  # the runner's base_url now
    with pytest.raises(UnknownSetting, match="EXECUTOR_COMPACTION_BASE_URL"):
        Settings()
    monkeypatch.delenv("EXECUTOR_COMPACTION_BASE_URL")
    assert Settings().compaction_model == "claude-haiku-4-5-20251001"


def test_settings_refuse_an_unknown_executor_variable_and_name_the_close_one(monkeypatch):
    from executor.errors import ConfigError, ExecutorError, UnknownSetting

    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_BUDGET_CPU", "3")
    with pytest.raises(UnknownSetting, match="EXECUTOR_BUDGET_CPU .did you mean EXECUTOR_BUDGET_CPUS") as raised:
        Settings()
    # one exception tree: a caller catching the executor's configuration errors catches this one too
    assert isinstance(raised.value, ConfigError) and isinstance(raised.value, ExecutorError)
    assert raised.value.reason == "unknown_setting"
    monkeypatch.delenv("EXECUTOR_BUDGET_CPU")
    monkeypatch.setenv("EXECUTOR_IMAGE", "executor:latest")  # compose's own: not a setting, not an error
    assert Settings().budget_cpus == 4.0


def test_settings_read_a_json_list_of_workspace_roots_and_refuse_relative_ones(monkeypatch, tmp_path):
    from pydantic import ValidationError

    _clear_env(monkeypatch)
    monkeypatch.setenv("EXECUTOR_WORKSPACE_ROOTS", json.dumps([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert Settings().workspace_roots == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.setenv("EXECUTOR_WORKSPACE_ROOTS", "srv/repos")
    with pytest.raises(ValidationError, match="absolute"):
        Settings()
    monkeypatch.setenv("EXECUTOR_WORKSPACE_ROOTS", '["/srv/repos",')
    with pytest.raises(ValidationError, match="JSON list"):
        Settings()


def test_every_executor_variable_compose_reads_is_a_setting_or_a_deployment_variable(monkeypatch):
    """compose.yaml reads some EXECUTOR_* variables for itself (images, host directories); .env hands them to
    the executor too, which must not refuse them as unknown settings."""
    from pathlib import Path

    from executor.settings import DEPLOYMENT_VARIABLES

    text = (Path(__file__).resolve().parents[2] / "compose.yaml").read_text()
    read = set(re.findall(r"\$\{(EXECUTOR_[A-Z_]+)", text))
    assert {"EXECUTOR_POSTGRES_DATA", "EXECUTOR_POSTGRES_IMAGE", "EXECUTOR_STATE_DIR"} <= read
    settings = {f"EXECUTOR_{name.upper()}" for name in Settings.model_fields}
    assert read <= settings | DEPLOYMENT_VARIABLES, read - settings - DEPLOYMENT_VARIABLES
    _clear_env(monkeypatch)
    for name in sorted(read - settings):
        monkeypatch.setenv(name, "x")
    assert Settings().budget_cpus == 4.0  # none of them is refused


def test_env_example_lists_every_setting():
    """.env.example is what a person reads to configure the executor: it must name every setting."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    listed = set(re.findall(r"^# (EXECUTOR_[A-Z_]+)=", text, re.M))
    assert {f"EXECUTOR_{name.upper()}" for name in Settings.model_fields} <= listed


# ---------------------------------------------------------------------------------------------
# runtime (runc or gVisor's runsc)


@pytest.mark.parametrize("network", ["host", "bridge"])
def test_a_runsc_policy_with_an_open_network_is_refused_with_the_way_out(tmp_path, network):
    write(tmp_path / "p.toml", f'runtime = "runsc"\nnetwork = "{network}"\n')
    with pytest.raises(ConfigError) as info:
        load_policy(tmp_path, "p")
    message = str(info.value)
    assert f'network = "{network}" cannot work under runtime = "runsc"' in message
    assert 'network = "sealed"' in message and 'runtime = "runc"' in message


def test_the_default_runtime_is_fixed_into_the_job_at_intake(world):
    repo = world.repo("app")
    assert validate(spec(workspace=str(repo)), world.settings()).policy.runtime == "runc"
    assert validate(spec(workspace=str(repo)), world.settings(default_runtime="runsc")).policy.runtime == "runsc"
    world.write_policy(runtime="runc")  # a policy that names its runtime keeps it whatever the default
    assert validate(spec(workspace=str(repo)), world.settings(default_runtime="runsc")).policy.runtime == "runc"


def test_a_host_network_policy_under_a_runsc_default_is_refused_at_intake(world):
    repo = world.repo("app")
    world.write_policy(network="host")
    message = invalid(spec(workspace=str(repo)), world.settings(default_runtime="runsc"))
    assert "EXECUTOR_DEFAULT_RUNTIME=runsc" in message and "cannot work under" in message


def test_runscs_host_pids_limit_grows_with_the_jobs_and_runcs_is_the_jobs():
    from executor.sandbox.deployment import host_pids_limit

    assert host_pids_limit(64, "runc") == 64
    assert host_pids_limit(64, "runsc") > 512  # room for gVisor's own threads, measured in the docstring
    assert host_pids_limit(256, "runsc") > host_pids_limit(64, "runsc")


def test_doctor_names_a_missing_runtime_and_who_asks_for_it():
    from executor.surfaces.doctor_runtimes import judge

    status, detail, fix = judge(["runc"], {"runc": ["EXECUTOR_DEFAULT_RUNTIME"], "runsc": ["policy strong"]})
    assert status == "problem" and "runsc is asked for by policy strong" in detail
    assert '"--host-uds=all", "--network=none"' in fix and "kill -HUP" in fix
    status, detail, fix = judge(["runc", "runsc"], {"runc": ["EXECUTOR_DEFAULT_RUNTIME"]})
    assert status == "ok" and fix is None and "offers runc, runsc" in detail
    status, _, fix = judge(["runc"], {"runc": ["EXECUTOR_DEFAULT_RUNTIME"]})
    assert status == "ok" and "apt install runsc" in fix  # how to get the stronger kernel
