"""The Gemini agent's parts without the engine: its stream (real transcripts of Gemini CLI 0.61.0) in the
executor's events, how a run ended, its command line, settings file and environment, and the Gemini API as its
gateway reads it."""

from __future__ import annotations

import json
from pathlib import Path

from executor.agent.events import parse_line
from executor.agent.gemini.agent import GEMINI
from executor.agent.gemini.api import GEMINI_API
from executor.agent.gemini.command import PLACEHOLDER_CREDENTIAL
from executor.agent.launch import CONFIG_MOUNT
from executor.agent.seam import LaunchRequest
from executor.policy import Policy, Runner

FIXTURES = Path(__file__).parent.parent / "fixtures" / "gemini-stream"
RUNNER = Runner(name="gm", agent="gemini", model="gemini-2.5-pro", auth_env="GKEY")


def _read(name: str):
    run = GEMINI.run()
    events = []
    for line in (FIXTURES / name).read_bytes().splitlines():
        events += run.feed(parse_line(line))
    return run, events


def test_a_real_gemini_stream_becomes_the_executors_events():
    run, events = _read("shell-success.jsonl")
    call = next(e.data for e in events if e.kind == "tool_call")
    result = next(e.data for e in events if e.kind == "tool_result")
    assert call["name"] == "run_shell_command" and "g.txt" in call["command"]
    assert result == {"tool_use_id": call["id"], "is_error": False, "content": "hi"}
    assert run.ended and run.final_text == "done" and run.session_id and run.models_seen == []
    assert run.input_tokens == 24920 and run.output_tokens == 9
    assert GEMINI.classify(run, 0).kind == "success" and GEMINI.tool_action("run_shell_command") == "shell"


def test_a_rate_limited_gemini_run_is_rate_limited():
    run, _ = _read("429.jsonl")
    outcome = GEMINI.classify(run, 173)
    assert outcome.kind == "rate_limited" and "exhausted" in outcome.message


def test_the_sealed_launch_serves_settings_and_holds_no_credential():
    launch = GEMINI.launch(LaunchRequest("do it", RUNNER, Policy(cli_max_retries=2), {"GKEY": "REAL-KEY"},
                                         sealed=True, system="SYSTEM-NOTE"))
    assert launch.argv[:2] == ["gemini", "-p"] and launch.argv[2].startswith("SYSTEM-NOTE") and "do it" in launch.argv[2]
    assert launch.argv[launch.argv.index("-m") + 1] == "gemini-2.5-pro"
    env = launch.environment
    assert env["GEMINI_API_KEY"] == PLACEHOLDER_CREDENTIAL and env["GOOGLE_GEMINI_BASE_URL"] == "http://127.0.0.1:8080"
    assert env["GEMINI_CLI_SYSTEM_SETTINGS_PATH"] == f"{CONFIG_MOUNT}/settings.json"
    settings = json.loads(launch.files["settings.json"])
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert settings["general"]["maxAttempts"] == 3 and settings["privacy"]["usageStatisticsEnabled"] is False
    assert "REAL-KEY" not in json.dumps([launch.argv, env, settings])


def test_the_gemini_protocol_names_the_model_in_the_path_and_drops_a_key_parameter():
    route = GEMINI_API.route("POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent")
    assert route is not None and (route.model_in, route.path_model) == ("path", "gemini-2.5-pro")
    assert GEMINI_API.route("GET", "/v1beta/models") is None
    assert GEMINI_API.route("POST", "/v1beta/models/x/../y:generateContent") is None
    assert GEMINI_API.forward_path("/v1beta/models/m:streamGenerateContent", "alt=sse&key=LEAK") == \
        "/v1beta/models/m:streamGenerateContent?alt=sse"
    assert GEMINI_API.auth_headers("REAL", "api_key") == {"x-goog-api-key": "REAL"}
    meter = GEMINI_API.meter("text/event-stream")
    for n in (1, 2):
        chunk = {"candidates": [], "modelVersion": "gemini-2.5-pro",
                 "usageMetadata": {"promptTokenCount": 50, "cachedContentTokenCount": 10, "candidatesTokenCount": n}}
        meter.feed(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
    assert meter.model == "gemini-2.5-pro"
    assert meter.finish() == {"input_tokens": 40, "cache_read_input_tokens": 10, "output_tokens": 2}
