"""The sealed sandbox on the real engine, the real sandbox image and the real CLI: jobs run with network none
and reach their API only through their gateway (the scripted API on 127.0.0.1 is the upstream) and the
outside only through their egress proxy. The container never holds the credential; a refused model, a
pings-only answer, the usage the API reported, a killed forwarder and twenty jobs at once."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

from executor.store import Status
from executor.surfaces.report import build_report
from tests.conftest import TOKEN_VALUE, wait_for, wait_status
from tests.scripted_api import ScriptedAPI, Turn
from tests.sealing import Origin

SETTLED = {Status.succeeded, Status.rolled_back, Status.failed, Status.stalled, Status.cancelled}
EXECUTOR = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "executor"
PLACEHOLDER = "sk-ant-sealed-placeholder-not-a-credential"
UI_TOKEN = "ui-token-for-the-sealed-tests-0b9e"  # the review page's token (sent as a bearer token)

# Searches everything the agent can read for the credential: its environment, every process's environ, and
# every file of the container (but the kernel's /proc, /sys and /dev trees). The value travels hex-encoded,
# so the command line and the transcript never hold it; a hit prints LEAK and fails the command.
SCAN = """import os, sys
needle = bytes.fromhex(sys.argv[1])
hits, files = [], 0
if any(needle in f"{k}={v}".encode() for k, v in os.environ.items()):
    hits.append("os.environ")
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        if needle in open(f"/proc/{pid}/environ", "rb").read():
            hits.append(f"/proc/{pid}/environ")
    except OSError:
        pass
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in names:
        path = os.path.join(root, name)
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        files += 1
        if needle in data:
            hits.append(path)
print(("LEAK " + " ".join(hits)) if hits else f"CLEAN: {files} files and every environment searched")
sys.exit(1 if hits else 0)
"""

# Inside the sealed container: where can it get? Prints one JSON object.
PROBE = """import http.client, json, socket, sys
port = int(sys.argv[1])
def direct(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
def tunnel(host, port):
    conn = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
    conn.set_tunnel(host, port)
    try:
        conn.request("GET", "/through-tunnel")
        response = conn.getresponse()
        return f"{response.status} {response.read().decode()}"
    except OSError as exc:
        return f"refused: {exc}"
def plain(url):
    conn = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
    conn.request("GET", url)
    response = conn.getresponse()
    return f"{response.status} {response.read().decode()}"
print(json.dumps({
    "direct_host": direct("127.0.0.1", port), "direct_out": direct("192.0.2.1", 443),
    "denied": tunnel("example.org", 443), "allowed": tunnel("127.0.0.1", port),
    "plain": plain(f"http://127.0.0.1:{port}/plain"), "loopback_name": tunnel("localhost", port),
}))
"""


def bash(command: str) -> Turn:
    return Turn.tool("Bash", {"command": command, "description": "run"})


def tool_results(api: ScriptedAPI) -> list[str]:
    """The tool results the CLI sent back to the API, in order."""
    found: list[str] = []
    for request in api.conversation:
        for message in request.body.get("messages", []):
            for block in message.get("content", []) if isinstance(message.get("content"), list) else []:
                if block.get("type") == "tool_result":
                    content = block.get("content")
                    text = content if isinstance(content, str) else " ".join(
                        c.get("text", "") for c in content or [] if isinstance(c, dict))
                    if text not in found:
                        found.append(text)
    return found


def test_a_sealed_job_succeeds_and_its_container_never_holds_the_credential(world, run_executor, docker_client):
    script = {"sealed-ok": [
        bash(f"python3 scan.py {TOKEN_VALUE.encode().hex()} && echo clean > clean.txt && sleep 3"),
        Turn.tool("Write", {"file_path": "/workspace/ok.txt", "content": "ok\n"}),
        Turn.text("Done."),
    ]}
    with ScriptedAPI(script, cache_tokens=True) as api:
        world.write_runners(api.base_url)
        world.write_policy(test_command="test -f ok.txt && test -f clean.txt")
        repo = world.repo("sealed", {"scan.py": SCAN})
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="sealed-ok", workspace=str(repo), prompt="sealed-ok: scan, then write ok.txt")
        container = wait_for(lambda: next(iter(docker_client.containers.list(
            filters={"label": ["io.executor.job=sealed-ok", "io.executor.role=agent"]})), None), 60,
            "the agent container")
        # From the host: what the engine gave the container, and every process's environment in it.
        config, host_config = container.attrs["Config"], container.attrs["HostConfig"]
        environ = container.exec_run(["sh", "-c", "cat /proc/[0-9]*/environ | tr '\\0' '\\n'"]).output.decode()
        job = wait_status(store, "sealed-ok", SETTLED, timeout=180)
        requests = api.requests
        results = tool_results(api)
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert (repo / "ok.txt").read_text() == "ok\n" and (repo / "clean.txt").exists()
    clean = next((r for r in results if r.startswith("CLEAN: ")), None)
    assert clean is not None and int(clean.split()[1]) > 5000, results  # the whole image was searched
    assert host_config["NetworkMode"] == "none"
    assert config["Cmd"][:4] == ["executor-forward", "8080=/run/executor/api.sock",
                                 "3128=/run/executor/egress.sock", "--"]
    assert TOKEN_VALUE not in json.dumps(container.attrs)  # env, command, mounts, labels
    assert f"ANTHROPIC_API_KEY={PLACEHOLDER}" in config["Env"]
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8080" in config["Env"]
    assert {"HTTPS_PROXY=http://127.0.0.1:3128", "https_proxy=http://127.0.0.1:3128",
            "NO_PROXY=127.0.0.1,localhost"} <= set(config["Env"])
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/run/executor"]["RW"] is False
    assert mounts["/run/executor"]["Source"] == str(world.home / "jobs" / "sealed-ok" / "sock")
    assert PLACEHOLDER in environ and TOKEN_VALUE not in environ
    # The API got the real credential on every request, never the placeholder.
    assert requests and all(r.headers.get("x-api-key") == TOKEN_VALUE for r in requests)
    assert all(PLACEHOLDER not in json.dumps(r.headers) for r in requests)
    assert not (world.home / "jobs" / "sealed-ok").exists()  # sockets gone with the attempt
    # Usage per request is what the API answered, request by request; the report sums it.
    rows = store.api_requests(job_id="sealed-ok")
    answered = [r for r in requests if r.usage is not None]
    assert len(rows) == len(answered) == 3
    for row, request in zip(rows, answered):
        assert (row.status, row.path, row.model, row.attempt, row.runner) == (
            200, "/v1/messages?beta=true", "claude-sonnet-4-5", 1, "scripted")
        assert {k: getattr(row, k) for k in request.usage} == request.usage
        assert row.request_bytes == request.size and row.response_bytes > 0 and 0 < row.latency <= row.duration
    report = build_report(store, timedelta(days=1))
    api_totals = report["api"]
    for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        assert api_totals[key] == sum(r.usage[key] for r in answered) > 0
    assert api_totals["requests"] == 3 and api_totals["by_status"] == {"200": 3}
    assert report["network"] == {"sealed": 1} and report["unsealed_jobs"] == 0
    text = subprocess.run([str(EXECUTOR), "report", "--since", "1d"], env=world.env(), capture_output=True,
                          text=True, timeout=60)
    assert f"api usage    3 requests of sealed jobs, as the API reported them: {api_totals['input_tokens']} input" \
        in text.stdout, text.stdout + text.stderr


def test_inside_a_sealed_job_only_the_egress_list_is_reachable(world, run_executor):
    with Origin() as origin:
        script = {"egress-probe": [bash(f"python3 probe.py {origin.port} > probe.json"), Turn.text("Done.")]}
        with ScriptedAPI(script) as api:
            world.write_runners(api.base_url)
            world.write_policy(egress=[f"127.0.0.1:{origin.port}", f"localhost:{origin.port}"],
                               test_command="test -s probe.json")
            repo = world.repo("probe", {"probe.py": PROBE})
            running = run_executor(world.settings(ui_port=0, ui_token=UI_TOKEN))
            store = running.executor.store
            world.submit(id="egress-probe", workspace=str(repo), prompt="egress-probe: look around")
            job = wait_status(store, "egress-probe", SETTLED, timeout=180)
            page = _fetch(f"http://127.0.0.1:{running.executor.web.port}/jobs/egress-probe")
    assert job.status == Status.succeeded, (job.reason, job.error)
    seen = json.loads((repo / "probe.json").read_text())
    assert seen["direct_host"].startswith("ConnectionRefusedError")  # network none: nothing listens there
    assert seen["direct_out"].startswith("OSError") and "unreachable" in seen["direct_out"]  # no route at all
    assert seen["denied"].startswith("refused: Tunnel connection failed: 403")
    assert seen["allowed"] == "200 origin saw /through-tunnel"
    assert seen["plain"] == "200 origin saw /plain"
    assert seen["loopback_name"].startswith("refused: Tunnel connection failed: 403")
    decisions = [(e.data["decision"], e.data["method"], e.data["host"], e.data["status"])
                 for e in store.events(job_id="egress-probe") if e.kind == "egress"]
    assert sorted(decisions) == sorted([("denied", "CONNECT", "example.org", 403),
                                        ("allowed", "CONNECT", "127.0.0.1", 200), ("allowed", "GET", "127.0.0.1", 200),
                                        ("denied", "CONNECT", "localhost", 403)])
    loopback = next(e.data for e in store.events(job_id="egress-probe")
                    if e.kind == "egress" and e.data["host"] == "localhost")
    assert "resolves to 127.0.0.1, a loopback address" in loopback["reason"]
    # show, its --json, the review page, the report and the metrics all have the denials
    shown = subprocess.run([str(EXECUTOR), "show", "egress-probe"], env=world.env(), capture_output=True, text=True,
                           timeout=60)
    assert "egress denied (2):" in shown.stdout and "CONNECT example.org:443 -> 403" in shown.stdout, shown.stdout
    assert f"network          sealed; egress 127.0.0.1:{origin.port}, localhost:{origin.port}" in shown.stdout
    as_json = json.loads(subprocess.run([str(EXECUTOR), "show", "egress-probe", "--json"], env=world.env(),
                                        capture_output=True, text=True, timeout=60).stdout)
    assert {(d["host"], d["port"]) for d in as_json["egress_denied"]} == {("example.org", 443),
                                                                        ("localhost", origin.port)}
    assert as_json["network"]["sealed"] and not as_json["network"]["unsealed"]
    assert 'id="egress-denied"' in page and "CONNECT example.org:443 -&gt; 403" in page
    assert build_report(store, timedelta(days=1))["egress"] == {
        "allowed": 2, "denied": 2, "denied_by_destination": {"example.org:443": 1, f"localhost:{origin.port}": 1}}
    assert store.metric_counters()["egress"] == {"allowed": 2, "denied": 2}


def _fetch(url: str) -> str:
    import urllib.request

    request = urllib.request.Request(url, headers={"authorization": f"Bearer {UI_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def test_a_runner_whose_model_the_cli_maps_elsewhere_is_refused_at_the_gateway(world, run_executor):
    """The CLI silently sends ``claude-opus-4-1`` as another model: the gateway refuses it before the API."""
    with ScriptedAPI({"mapped": [Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url, models={"scripted": "claude-opus-4-1"})
        world.write_policy(cli_max_retries=2)
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="mapped", workspace=str(world.repo("mapped")), prompt="mapped: say hi")
        job = wait_status(store, "mapped", SETTLED, timeout=180)
        seen = api.requests
    assert seen == []  # the API never saw it
    assert (job.status, job.reason) == (Status.failed, "model_mismatch")
    assert job.error.startswith("scripted failed: ModelMismatch: the runner's model is 'claude-opus-4-1' but the "
                                "agent asked for 'claude-opus-5-5'"), job.error
    refused = [e.data for e in store.events(job_id="mapped") if e.kind == "gateway_refused"]
    assert refused and {(r["kind"], r["status"], r["requested_model"], r["expected_model"]) for r in refused} == {
        ("model", 400, "claude-opus-5-5", "claude-opus-4-1")}


def test_the_agents_own_call_for_another_model_is_refused_and_stops_the_job(world, run_executor):
    call = ("python3 -c \"import json, urllib.request; body = json.dumps({'model': 'claude-haiku-4-5', "
            "'max_tokens': 5, 'messages': [{'role': 'user', 'content': 'hi'}]}).encode(); "
            "req = urllib.request.Request('http://127.0.0.1:8080/v1/messages', body, "
            "{'content-type': 'application/json'}); urllib.request.urlopen(req)\"; sleep 60")
    with ScriptedAPI({"sneaky": [bash(call), Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="sneaky", workspace=str(world.repo("sneaky")), prompt="sneaky: call another model")
        job = wait_status(store, "sneaky", SETTLED, timeout=180)
        models = {r.body.get("model") for r in api.requests}
    assert (job.status, job.reason) == (Status.failed, "model_mismatch"), (job.reason, job.error)
    assert "'claude-haiku-4-5'" in job.error and "'claude-sonnet-4-5'" in job.error
    assert models == {"claude-sonnet-4-5"}  # the API never saw the other model
    ended = next(e.data for e in store.events(job_id="sneaky") if e.kind == "agent_end")
    assert ended["stopped"] == "model_mismatch"
    # stopped at once: the Bash call (its request, then a 60 s sleep) never came back to the agent
    calls = [e for e in store.events(job_id="sneaky") if e.kind in ("tool_call", "tool_result")]
    assert [e.kind for e in calls] == ["tool_call"], [(e.kind, e.data) for e in calls]


def test_a_slow_answer_of_pings_only_passes_and_is_not_a_stall(world, run_executor):
    slow = Turn.after_pings(Turn.tool("Write", {"file_path": "/workspace/late.txt", "content": "late\n"}),
                            count=16, interval=0.5)  # 8 s of pings and nothing for the CLI to print
    with ScriptedAPI({"slow": [slow, Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        world.write_policy(heartbeat_interval="1s", stall_after="4s", test_command="test -f late.txt")
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="slow", workspace=str(world.repo("slow")), prompt="slow: think long")
        job = wait_status(store, "slow", SETTLED, timeout=180)
    assert job.status == Status.succeeded, (job.reason, job.error)
    first = store.api_requests(job_id="slow")[0]
    # 8 s of pings by the script's construction; that chunks pass as they come is tests/integration/test_gateway.py's
    assert first.duration >= 8.0 and first.status == 200
    states = [b.state for b in store.heartbeats("slow")]
    assert states.count("api_streaming") >= 3, states  # only the gateway saw it move, and that was progress


def test_killing_the_forwarder_fails_that_job_only(world, run_executor):
    kill = ("python3 -c \"import os, signal\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    argv = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\\\0')\n"
            "    if len(argv) > 1 and argv[1].endswith(b'/executor-forward'): os.kill(int(p), signal.SIGKILL)\"")
    script = {"victim": [bash(kill), Turn.text("Done.")], "after": [Turn.text("Done.")]}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cli_max_retries=0)
        running = run_executor(world.settings())
        store = running.executor.store
        world.submit(id="victim", workspace=str(world.repo("victim")), prompt="victim: kill the forwarder")
        victim = wait_status(store, "victim", SETTLED, timeout=180)
        world.submit(id="after", workspace=str(world.repo("after")), prompt="after: go")
        after = wait_status(store, "after", SETTLED, timeout=180)
        victim_requests = [r for r in api.conversation if r.key == "victim"]
    assert victim.status != Status.succeeded and victim.reason in ("api_error", "agent_error"), (victim.reason,
                                                                                                victim.error)
    assert len(victim_requests) == 1  # its next call could not leave the container
    assert after.status == Status.succeeded, (after.reason, after.error)
    assert running.executor.sealer.loop.thread.is_alive()


def test_twenty_sealed_jobs_at_once(world, run_executor):
    ids = [f"many-{i:02d}" for i in range(20)]
    script = {job_id: [Turn.tool("Write", {"file_path": "/workspace/done.txt", "content": f"{job_id}\n"}),
                       Turn.text("Done.")] for job_id in ids}
    with ScriptedAPI(script) as api:
        world.write_runners(api.base_url)
        world.write_policy(cpus=0.1, memory="350m", test_command="test -f done.txt")
        running = run_executor(world.settings(budget_cpus=2.0, budget_memory="8g"))
        store = running.executor.store
        repos = {job_id: world.repo(job_id) for job_id in ids}
        most = [0]
        stop = threading.Event()

        def watch() -> None:  # how many sealed jobs hold a slot at once
            while not stop.is_set():
                most[0] = max(most[0], len(running.executor.sealer.gateways.job_ids()))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for job_id in ids:
            world.submit(id=job_id, workspace=str(repos[job_id]), prompt=f"{job_id}: write done.txt")
        jobs = [wait_status(store, job_id, SETTLED, timeout=900) for job_id in ids]
        stop.set()
        watcher.join()
        requests = api.requests
    assert [j.status for j in jobs] == [Status.succeeded] * 20, [(j.id, j.reason, j.error) for j in jobs]
    assert most[0] == 20  # all twenty gateways served at the same time
    assert all((repos[job_id] / "done.txt").read_text() == f"{job_id}\n" for job_id in ids)
    assert len(requests) == 40 and all(r.headers.get("x-api-key") == TOKEN_VALUE for r in requests)
    rows = store.api_requests()
    assert len(rows) == 40 and {r.status for r in rows} == {200}
    assert {r.job_id for r in rows} == set(ids)


def test_an_unsealed_opt_in_runs_as_before_and_is_flagged_everywhere(world, run_executor):
    with ScriptedAPI({"open": [Turn.text("Done.")]}) as api:
        world.write_runners(api.base_url)
        world.write_policy("open", network="host")
        running = run_executor(world.settings(ui_port=0, ui_token=UI_TOKEN))
        store = running.executor.store
        world.submit(id="open", policy="open", workspace=str(world.repo("open")), prompt="open: go")
        job = wait_status(store, "open", SETTLED, timeout=120)
        page = _fetch(f"http://127.0.0.1:{running.executor.web.port}/jobs/open")
        requests = api.requests
    assert job.status == Status.succeeded, (job.reason, job.error)
    assert requests and store.api_requests(job_id="open") == []  # no gateway: straight to the API
    shown = subprocess.run([str(EXECUTOR), "show", "open"], env=world.env(), capture_output=True, text=True,
                           timeout=60).stdout
    assert "network          UNSEALED: network 'host' (an explicit opt-in of policy 'open')" in shown
    as_json = json.loads(subprocess.run([str(EXECUTOR), "show", "open", "--json"], env=world.env(),
                                        capture_output=True, text=True, timeout=60).stdout)
    assert as_json["network"]["unsealed"] is True and "real credential" in as_json["network"]["warning"]
    assert 'id="unsealed"' in page and "UNSEALED: network &#39;host&#39;" in page
    report = build_report(store, timedelta(days=1))
    assert report["unsealed_jobs"] == 1 and report["network"] == {"host": 1}
