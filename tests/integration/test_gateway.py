"""The sealed sandbox's API gateway on the host, without a container: a client on the job's Unix socket, the
scripted API (or a pings-only server) on 127.0.0.1 as the upstream. The integration tier drives the same
gateway with the real CLI in a network-less container (tests/integration/test_sealed.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from executor.sandbox.usage import ResponseMeter
from tests.scripted_api import ScriptedAPI, Turn
from tests.sealing import (
    MODEL,
    REAL_KEY,
    UID,
    HostSide,
    PingsOnly,
    UnixHTTPConnection,
    messages_body,
    post,
    upstream,
    wait_until,
)

PLACEHOLDER = "sk-placeholder"


@pytest.fixture
def host():
    side = HostSide()
    yield side
    side.close()


def test_sockets_belong_to_the_jobs_uid_in_a_root_owned_searchable_directory(host):
    with ScriptedAPI() as api:
        job = host.add_job("perms", upstream(api.base_url))
        directory = os.stat(job.directory)
        assert (stat.S_IMODE(directory.st_mode), directory.st_uid) == (0o711, 0)
        for path in (job.api_socket, job.egress_socket):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == UID
        host.remove_job(job)
        assert not job.api_socket.exists() and not job.egress_socket.exists()
        host.remove_job(job)  # closing twice is fine


def test_a_socket_path_longer_than_a_socket_address_is_served(host):
    with ScriptedAPI() as api:
        job = host.add_job("j" * 64 + "-" + "x" * 40, upstream(api.base_url))
        assert len(os.fsencode(job.api_socket)) > 107
        assert post(job.api_socket)[0].status == 200


def test_the_real_credential_replaces_the_placeholder_on_every_request_of_a_kept_alive_connection(host):
    with ScriptedAPI() as api:
        for auth_type, (header, value) in (("api_key", ("x-api-key", REAL_KEY)),
                                           ("oauth_token", ("authorization", f"Bearer {REAL_KEY}"))):
            job = host.add_job(f"keepalive-{auth_type}", upstream(api.base_url, auth_type))
            conn = UnixHTTPConnection(job.api_socket)
            sockets = set()
            for _ in range(3):
                conn.request("POST", "/v1/messages?beta=true", messages_body(),
                             {"x-api-key": PLACEHOLDER, "authorization": f"Bearer {PLACEHOLDER}",
                              "content-type": "application/json"})
                assert conn.getresponse().read() and conn.sock is not None
                sockets.add(id(conn.sock))
            conn.close()
            assert len(sockets) == 1  # all three on one connection
            seen = api.requests[-3:]
            other = "authorization" if header == "x-api-key" else "x-api-key"
            assert all(r.headers.get(header) == value and other not in r.headers for r in seen)
            assert all(PLACEHOLDER not in json.dumps(r.headers) for r in seen)
            assert wait_until(lambda job=job: len(job.records) == 3)
            assert all(r.usage["input_tokens"] > 0 and r.model == MODEL for r in job.records)


def test_other_routes_and_other_models_are_refused_before_the_api(host):
    with ScriptedAPI() as api:
        job = host.add_job("refusals", upstream(api.base_url))
        conn = UnixHTTPConnection(job.api_socket)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        assert response.status == 403 and json.loads(response.read())["error"]["type"] == "permission_error"
        conn.request("POST", "/v1/messages", messages_body(model="claude-opus-4-1"))
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 400 and body["error"]["type"] == "invalid_request_error"
        assert "claude-opus-4-1" in body["error"]["message"] and REAL_KEY not in json.dumps(body)
        conn.request("POST", "/v1/messages", "not json")
        assert conn.getresponse().status == 400
        conn.close()
        assert api.requests == []
        assert wait_until(lambda: len(job.refusals) == 3)  # recorded after each response is sent
        assert [(r.kind, r.requested_model, r.expected_model) for r in job.refusals] == [
            ("route", None, None), ("model", "claude-opus-4-1", MODEL), ("body", None, None)]
        assert job.sealed.refused_models == ["claude-opus-4-1"] and job.sealed.refused()


def test_a_streamed_answer_passes_as_it_arrives_and_its_usage_is_read(host):
    """Each delta reaches the client while the upstream still holds the next one back (it sends it only when
    the test, having read this one, releases it): nothing is buffered, whatever the timing."""
    gate = threading.Semaphore(0)
    with ScriptedAPI([Turn.gated_text("abcdefghij", chunks=5, gate=gate)]) as api:
        job = host.add_job("slow", upstream(api.base_url))
        conn = UnixHTTPConnection(job.api_socket)
        conn.request("POST", "/v1/messages", messages_body(stream=True))
        response = conn.getresponse()
        conn.sock.settimeout(20)  # a held-back delta fails the read instead of hanging the suite
        deltas = []
        while line := response.readline():
            if line.startswith(b"data:") and b"text_delta" in line:
                deltas.append(json.loads(line[5:])["delta"]["text"])
                gate.release()  # only now may the upstream send the next delta
        conn.close()
        assert deltas == ["ab", "cd", "ef", "gh", "ij"]  # each came before the next was sent
        assert wait_until(lambda: job.records)
        record = job.records[0]
        assert record.status == 200 and record.usage["input_tokens"] > 0 and record.usage["output_tokens"] > 1
        assert record.latency <= record.duration and record.response_bytes > 0


def test_rate_limit_headers_and_the_apis_error_message_are_recorded(host):
    headers = {"retry-after": "1", "anthropic-ratelimit-requests-remaining": "0"}
    with ScriptedAPI([Turn.error(429, "rate_limit_error", "slow down", headers)]) as api:
        job = host.add_job("ratelimit", upstream(api.base_url))
        response, _ = post(job.api_socket)
        assert response.status == 429 and response.getheader("retry-after") == "1"
        assert wait_until(lambda: job.records)
        assert job.records[0].rate_limits == headers and job.records[0].message == "slow down"


def test_an_unreachable_upstream_is_a_retryable_502(host):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    job = host.add_job("unreachable", upstream(f"http://127.0.0.1:{port}"))
    response, _ = post(job.api_socket)
    assert response.status == 502 and response.getheader("x-should-retry") == "true"
    assert wait_until(lambda: job.records) and job.records[0].error.startswith("upstream: ")


def test_pings_are_activity_and_a_hangup_ends_the_upstream_stream(host):
    with PingsOnly(interval=0.1) as server:
        job = host.add_job("pings", upstream(server.base_url))
        conn = UnixHTTPConnection(job.api_socket)
        conn.request("POST", "/v1/messages", messages_body(stream=True))
        response = conn.getresponse()
        pings = sum(response.readline().startswith(b"event: ping") for _ in range(30))  # 10 events
        assert pings == 9
        assert len(job.activity) >= 10  # message_start + 9 pings, each a sign of life
        conn.close()
        assert server.client_gone.wait(5)  # the container hung up: the gateway dropped the upstream stream
        assert wait_until(lambda: job.records) and job.records[0].error == "client disconnected"
        assert job.records[0].usage == {"input_tokens": 7, "output_tokens": 1}


def stream_ends(sock, within: float) -> bool:
    """Whether the stream on ``sock`` ends (EOF or reset) before ``within`` seconds of reading pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
    return False


def test_closing_a_job_cuts_its_open_stream_and_leaves_the_others(host):
    with PingsOnly(interval=0.2) as server:
        threads_before = threading.active_count()
        jobs = [host.add_job(f"many-{i}", upstream(server.base_url)) for i in range(6)]
        assert threading.active_count() == threads_before  # one loop for all: no thread per job
        conns = []
        for job in jobs:
            conn = UnixHTTPConnection(job.api_socket)
            conn.request("POST", "/v1/messages", messages_body(stream=True))
            conn.getresponse().fp.readline()
            conns.append(conn)
        victim, others = jobs[0], jobs[1:]
        host.remove_job(victim)
        assert not victim.api_socket.exists()
        conns[0].sock.settimeout(5)
        assert stream_ends(conns[0].sock, within=30), "the victim's stream was not cut"
        counts = [len(job.activity) for job in others]
        assert wait_until(lambda: all(len(job.activity) > n + 2 for job, n in zip(others, counts)))
        for conn in conns:
            conn.close()


def test_the_meter_reads_usage_from_sse_and_json_bodies_without_keeping_them():
    sse = ResponseMeter("text/event-stream")
    start = {"type": "message_start", "message": {"model": "m-1", "usage": {"input_tokens": 10, "output_tokens": 1,
                                                                           "cache_read_input_tokens": 4}}}
    delta = {"type": "message_delta", "usage": {"output_tokens": 42}}
    wire = (f"event: message_start\ndata: {json.dumps(start)}\n\n" + "event: ping\ndata: {}\n\n"
            f"event: message_delta\ndata: {json.dumps(delta)}\n\n").encode()
    for i in range(0, len(wire), 7):  # split anywhere, even inside a line
        sse.feed(wire[i:i + 7])
    assert sse.finish() == {"input_tokens": 10, "output_tokens": 42, "cache_read_input_tokens": 4}
    assert sse.model == "m-1" and sse.bytes == len(wire)
    plain = ResponseMeter("application/json")
    plain.feed(json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}).encode())
    assert plain.finish() == {} and plain.error == "busy"


def test_a_socket_directory_that_cannot_be_made_is_a_sandbox_error_and_leaves_nothing_served(tmp_path):
    from executor.errors import SandboxError
    from executor.job.context import Context
    from executor.job.sealed import SealedAttempt
    from executor.policy import Policy, Runner
    from executor.sandbox.seal import Sealer
    from executor.settings import Settings
    from executor.store import Job, Store
    from executor.transaction.workspace import Workspace
    from tests.unit.fakes import FakeDeployment

    settings = Settings(home=tmp_path / "home", policies=tmp_path)
    job = Job(id="j", session_id="j", runner="r", model_requested=MODEL, workspace=str(tmp_path), prompt="p",
              policy_name="default", attempts=1)
    ws = Workspace.of(settings, job)
    ws.root.mkdir(parents=True)
    ws.sockets.write_text("a file where the socket directory goes\n")
    sealer = Sealer().start()
    store = Store(settings.db_path)
    ctx = Context(settings=settings, store=store, sandbox=FakeDeployment(),
                  runners={}, secrets={"T": REAL_KEY}, sealer=sealer)
    try:
        with pytest.raises(SandboxError, match=f"cannot serve the job's sockets in {ws.sockets}"):
            SealedAttempt.open(ctx, job, ws, Runner(name="r", model=MODEL, auth_env="T"), Policy())
        assert sealer.gateways.job_ids() == []
    finally:
        sealer.stop()
        store.close()


def test_the_socket_directory_is_given_to_the_engine_by_its_host_path():
    """Under compose the state root may be mounted from another host path: the engine binds the host's."""
    from executor.sandbox.deployment import SOCKETS_MOUNT, ContainerSpec, Limits, Sandbox
    from executor.sandbox.hostpaths import HostPaths

    paths = HostPaths(binds=(("/srv/executor/state", "/home/me/executor/state"),))
    sandbox = Sandbox(client=None, image="unused", paths=paths)
    spec = ContainerSpec(name="n", command=["true"], user="1000:1000", volume="v", limits=Limits(1.0, 2**30, 64),
                         network="none", labels={}, sockets="/srv/executor/state/jobs/j/sock")
    sockets = next(m for m in sandbox._mounts(spec) if m["Target"] == SOCKETS_MOUNT)
    assert sockets["Source"] == "/home/me/executor/state/jobs/j/sock" and sockets["ReadOnly"] is True
