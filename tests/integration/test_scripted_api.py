"""The scripted Messages API fake, exercised with the real ``anthropic`` SDK as its client."""

from __future__ import annotations

import http.client
import sys
import threading
import time
from pathlib import Path

import anthropic
import pytest

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.scripted_api import ScriptedAPI, Turn, is_side_request  # noqa: E402

TOOLS = [{"name": "Write", "description": "write a file",
          "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}]


def client(api: ScriptedAPI) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.base_url, api_key="sk-fake", max_retries=0, timeout=5)


def ask(c: anthropic.Anthropic, prompt: str = "hello", model: str = "claude-test-1", **kw):
    return c.messages.stream(model=model, max_tokens=1000, tools=TOOLS,
                             messages=[{"role": "user", "content": prompt}], **kw)


def test_streaming_text():
    with ScriptedAPI([Turn.text("Hello there, world.")]) as api:
        with ask(client(api)) as stream:
            events = [e.type for e in stream]
            msg = stream.get_final_message()
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello there, world."
    assert msg.stop_reason == "end_turn"
    assert msg.model == "claude-test-1"
    assert msg.id.startswith("msg_")
    assert msg.usage.output_tokens >= 1 and msg.usage.input_tokens >= 1
    assert events.count("text") >= 2  # the text arrives in several deltas
    assert events[-1] == "message_stop"


def test_streaming_tool_use_input_is_reassembled():
    big = {"file_path": "/w/hello.txt", "content": "line\n" * 50, "nested": {"a": [1, 2, {"b": "ü"}]}}
    with ScriptedAPI([Turn.tool("Write", big, text="Writing."),
                      Turn.tools(("Write", {"file_path": "/w/a"}), ("Bash", {"command": "ls"}))]) as api:
        c = client(api)
        with ask(c) as stream:
            deltas = [e for e in stream if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            msg = stream.get_final_message()
        with ask(c) as stream:
            msg2 = stream.get_final_message()
    assert len(deltas) >= 2
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[1].name == "Write" and msg.content[1].input == big
    assert msg.content[1].id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in msg2.content] == [("Write", {"file_path": "/w/a"}), ("Bash", {"command": "ls"})]
    ids = {msg.content[1].id, *(b.id for b in msg2.content)}
    assert len(ids) == 3


def test_non_streaming_and_count_tokens():
    with ScriptedAPI([Turn.tool("Write", {"file_path": "x"})], model_override="claude-other") as api:
        c = client(api)
        msg = c.messages.create(model="claude-test-1", max_tokens=100, tools=TOOLS,
                                messages=[{"role": "user", "content": "hi"}])
        count = c.messages.count_tokens(model="claude-test-1", messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].input == {"file_path": "x"} and msg.stop_reason == "tool_use"
    assert msg.model == "claude-other"
    assert count.input_tokens >= 1


def test_rate_limit_error_surfaces_with_retry_after():
    with ScriptedAPI([Turn.error(429, "rate_limit_error", "slow down", {"retry-after": "1"})]) as api:
        with pytest.raises(anthropic.RateLimitError) as info:
            with ask(client(api)) as stream:
                stream.get_final_message()
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["error"] == {"type": "rate_limit_error", "message": "slow down"}


def test_other_errors_map_to_sdk_types():
    with ScriptedAPI([Turn.error(529, "overloaded_error", "Overloaded"),
                      Turn.error(401, "authentication_error", "bad key")]) as api:
        c = client(api)
        with pytest.raises(anthropic.InternalServerError) as info:
            c.messages.create(model="m", max_tokens=10, tools=TOOLS, messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 529
        with pytest.raises(anthropic.AuthenticationError):
            c.messages.create(model="m", max_tokens=10, tools=TOOLS, messages=[{"role": "user", "content": "x"}])


def test_requests_are_recorded_and_side_requests_do_not_consume_the_script():
    with ScriptedAPI([Turn.text("scripted")]) as api:
        c = client(api)
        # side requests: no tools, or a max_tokens=1 probe
        side = c.messages.create(model="claude-haiku", max_tokens=50, messages=[{"role": "user", "content": "title?"}])
        c.messages.create(model="m", max_tokens=1, tools=TOOLS, messages=[{"role": "user", "content": "quota"}])
        with ask(c, prompt="the real prompt") as stream:
            msg = stream.get_final_message()
        conn = http.client.HTTPConnection("127.0.0.1", int(api.base_url.rsplit(":", 1)[1]), timeout=5)
        conn.request("HEAD", "/")
        assert conn.getresponse().status == 200
        conn.close()
        reqs = api.requests
    assert side.content[0].text == "OK"
    assert msg.content[0].text == "scripted"
    assert [r.side for r in reqs[:3]] == [True, True, False]
    main = reqs[2]
    assert main.method == "POST" and main.path == "/v1/messages"
    assert main.body["stream"] is True and main.body["messages"][0]["content"] == "the real prompt"
    assert "sk-fake" in (main.headers.get("x-api-key", "") + main.headers.get("authorization", ""))
    assert main.headers["content-type"] == "application/json"
    assert main.size == int(main.headers["content-length"]) > 0
    assert main.first_user_text == "the real prompt" and main.key == ""
    assert reqs[0].time <= reqs[2].time <= time.time()
    assert reqs[3].method == "HEAD"
    assert api.conversation == [main]
    assert is_side_request({"model": "m", "max_tokens": 5, "messages": []})


def test_dict_keyed_routing_default_and_add():
    script = {"job-A": [Turn.text("A1"), Turn.text("A2")], "job-B": [Turn.text("B1")]}
    with ScriptedAPI(script, default=Turn.text("fallback")) as api:
        c = client(api)

        def say(prompt: str) -> str:
            with ask(c, prompt=prompt) as stream:
                return stream.get_final_message().content[0].text

        # the prompt may be wrapped in other text (the CLI prepends system reminders)
        got = [say("<reminder/> do job-B now"), say("do job-A"), say("job-A again"), say("job-A 3"),
               say("nobody's key")]
        api.add("job-C", [Turn.text("C1")])
        api.add("job-B", [Turn.text("B2")])
        got += [say("job-C"), say("job-B")]
    assert got == ["B1", "A1", "A2", "fallback", "fallback", "C1", "B2"]
    assert [r.key for r in api.requests] == ["job-B", "job-A", "job-A", "job-A", None, "job-C", "job-B"]


def test_first_user_message_with_blocks_is_matched():
    with ScriptedAPI({"KEY-7": [Turn.text("seven")]}) as api:
        msg = client(api).messages.create(
            model="m", max_tokens=10, tools=TOOLS,
            messages=[{"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                                   {"type": "text", "text": "please KEY-7"}]},
                      {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "follow-up"}])
    assert msg.content[0].text == "seven"


def test_empty_script_answers_done():
    with ScriptedAPI() as api:
        with ask(client(api)) as stream:
            assert stream.get_final_message().content[0].text == "Done."


def test_slow_text_streams_steadily():
    with ScriptedAPI([Turn.slow_text("abcdefgh", chunks=4, interval=0.05)]) as api:
        with ask(client(api)) as stream:
            stamps = [time.monotonic() for e in stream if e.type == "text"]
            text = stream.get_final_message().content[0].text
    assert text == "abcdefgh"
    assert len(stamps) == 4
    assert stamps[-1] - stamps[0] >= 0.12


def test_hang_sends_message_start_then_holds_until_stop():
    api = ScriptedAPI([Turn.hang()]).start()
    seen: list[str] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            with ask(client(api)) as stream:
                for e in stream:
                    seen.append(e.type)
        except BaseException as e:  # the connection is dropped when the server stops
            errors.append(e)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    deadline = time.monotonic() + 3
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert seen == ["message_start"] and t.is_alive()
    api.stop()
    t.join(timeout=10)
    assert not t.is_alive()  # stopping the server ended the held stream
    assert seen == ["message_start"]  # nothing more: no message_stop, the stream just ended or broke


def test_toolless_requests_are_scripted_when_keyed_or_when_the_filter_says_so():
    plain = [{"role": "user", "content": "summarise COMPACT-1 please"}]
    with ScriptedAPI({"COMPACT-1": [Turn.text("summary")]}) as api:
        c = client(api)
        msg = c.messages.create(model="claude-haiku", max_tokens=200, messages=plain)
        probe = c.messages.create(model="claude-haiku", max_tokens=1, messages=plain)
    assert msg.content[0].text == "summary" and probe.content[0].text == "OK"
    assert [r.side for r in api.requests] == [False, True]

    with ScriptedAPI([Turn.text("one"), Turn.text("two")], side_filter=lambda body: False) as api:
        c = client(api)
        texts = [c.messages.create(model="m", max_tokens=50, messages=plain).content[0].text]
        with c.messages.stream(model="m", max_tokens=50, messages=plain) as stream:
            texts.append(stream.get_final_message().content[0].text)
    assert texts == ["one", "two"]


def test_a_second_model_on_the_same_endpoint_gets_its_own_turn_and_usage_is_recorded():
    with ScriptedAPI([Turn.text("agent")], models={"small-1": Turn.text("summary")}, cache_tokens=True) as api:
        c = client(api)
        small = c.messages.create(model="small-1", max_tokens=50, messages=[{"role": "user", "content": "x"}])
        with ask(c) as stream:
            agent = stream.get_final_message()
        again = c.messages.create(model="small-1", max_tokens=50, messages=[{"role": "user", "content": "y"}])
    assert (small.content[0].text, agent.content[0].text, again.content[0].text) == ("summary", "agent", "summary")
    assert [r.key for r in api.requests] == ["model:small-1", "", "model:small-1"]
    assert [r.body["model"] for r in api.conversation] == ["claude-test-1"]  # the script's own requests only
    for request, answer in zip(api.requests, (small, agent, again)):
        assert request.usage == answer.usage.model_dump(include={
            "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"})
        assert request.usage["cache_read_input_tokens"] > 0 and request.usage["cache_creation_input_tokens"] == 11


def test_pings_before_the_answer_take_their_time_and_pass_no_content():
    import json

    script = [Turn.after_pings(Turn.text("late"), count=4, interval=0.25)]
    with ScriptedAPI(list(script)) as api:
        with ask(client(api)) as stream:
            msg = stream.get_final_message()
    assert msg.content[0].text == "late"
    with ScriptedAPI(list(script)) as api:  # the raw stream: the pings come first, and carry nothing
        conn = http.client.HTTPConnection(api.base_url.removeprefix("http://"), timeout=30)
        conn.request("POST", "/v1/messages", json.dumps({
            "model": "claude-test-1", "max_tokens": 64, "stream": True, "tools": TOOLS,
            "messages": [{"role": "user", "content": "hello"}]}), {"content-type": "application/json"})
        lines = conn.getresponse().read().decode().splitlines()
        conn.close()
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    # the ping the API always sends after message_start, then the four scripted ones, then the content
    assert kinds[:7] == ["message_start"] + ["ping"] * 5 + ["content_block_start"], kinds
    pings = [json.loads(lines[i + 1].removeprefix("data: ")) for i, line in enumerate(lines) if line == "event: ping"]
    assert pings == [{"type": "ping"}] * 5


def test_replay_answers_a_keyed_script_by_the_conversations_place():
    """An attempt run again after a fault hears its script from the start, whatever the first attempt used."""
    script = {"job-r": [Turn.text("first"), Turn.text("second")]}
    with ScriptedAPI(script, replay=True) as api:
        c = client(api)
        opening = [{"role": "user", "content": "job-r: work"}]
        later = opening + [{"role": "assistant", "content": "first"}, {"role": "user", "content": "go on"}]
        answers = [c.messages.create(model="m", max_tokens=100, tools=TOOLS, messages=m).content[0].text
                   for m in (opening, later, opening, later)]
    assert answers == ["first", "second", "first", "second"]
