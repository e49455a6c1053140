"""Attacks on what a sealed job can make the executor hold, against the real gateway and egress proxy on real
sockets (the attacking client in a process of its own, as a job's would be): connections and their bodies
(the memory of the process serving the gateway stays within the executor's reserve), bodies the gateway
cannot parse strictly or whose parse could exhaust it, two "model" keys, and a flooding job's records beside
a quiet job's close. The integration tier runs the same attacks from inside a sealed container."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from executor.sandbox.bodies import IN_MEMORY
from executor.sandbox.seal import SealLimits
from executor.settings import Settings
from tests.scripted_api import ScriptedAPI
from tests.sealing import MODEL, HostSide, Sink, UnixHTTPConnection, messages_body, post, upstream, wait_until

BIG = 32 * 1024 * 1024

# A job's attack: N connections to a socket, each sending a request head and then a body. "hold": one byte
# short of the body's declared length, then hold the connection; "send": the whole body, then print the
# answer's status. Runs in its own process: its memory is not the gateway's.
ATTACK = r"""
import json, socket, sys, threading
path, count, mode, size, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
if kind == "fill":
    body = b"x" * size
else:  # a legitimate request around one large string, as an image would be
    head = json.dumps({"model": sys.argv[6], "max_tokens": 8, "messages": [{"role": "user", "content": "%s"}]})
    a, b = head.encode().split(b"%s")
    body = a + b"Q" * (size - len(a) - len(b)) + b
statuses, conns, connected = [], [], threading.Semaphore(0)
def one():
    s = socket.socket(socket.AF_UNIX)
    conns.append(s)  # held until the process ends
    s.connect(path)  # returns once the connection is queued: accepted or not
    connected.release()
    s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: sandbox\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body))
    s.sendall(memoryview(body)[:-1] if mode == "hold" else body)
    if mode == "send":
        answer = b""
        while b"\r\n" not in answer:
            answer += s.recv(4096)
        statuses.append(int(answer.split()[1]))
threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
for t in threads:
    t.start()
for _ in threads:
    connected.acquire()
if mode == "hold":
    print("connected", flush=True)
    sys.stdin.read()  # until the test closes it
else:
    for t in threads:
        t.join()
    print(json.dumps(sorted(statuses)), flush=True)
"""


def attack(socket_path: Path, count: int, mode: str, size: int, kind: str = "fill") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ATTACK, str(socket_path), str(count), mode, str(size), kind, MODEL],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def spooled(directory: Path) -> list[int]:
    """Sizes of the unnamed body files this process holds open in ``directory`` (a job's spool)."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{directory}/") and target.endswith(" (deleted)"):
                sizes.append(os.stat(f"/proc/self/fd/{fd}").st_size)
        except OSError:
            continue
    return sorted(sizes)


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture
def host():
    side = HostSide()
    yield side
    side.close()


def test_24_connections_holding_32_mib_bodies_wait_their_turn_and_the_bodies_stay_on_disk(host):
    reserve = Settings().reserve_memory
    with Sink() as sink:
        job = host.add_job("hold", upstream(sink.base_url))
        assert post(job.api_socket)[0].status == 200  # warm: the first request's imports and pools are made
        spool = job.directory.parent / "bodies"
        before = rss()
        client = attack(job.api_socket, 24, "hold", BIG)
        assert client.stdout.readline() == "connected\n"
        limit = SealLimits().gateway_connections
        # Every accepted connection's body is on disk, in the job's own directory, with no name; the others
        # were not accepted at all: they wait in the socket's backlog.
        assert wait_until(lambda: spooled(spool) == [BIG - 1] * limit, timeout=120), spooled(spool)
        grown = rss() - before
        assert host.sealer.gateways.connections("hold") == (limit, limit + 1)  # + the warm-up's
        assert grown < reserve, f"the gateway's process grew {grown >> 20} MiB holding 24 bodies"
        print(f"\nRSS growth with 24 connections holding 32 MiB bodies: {grown / 2**20:.1f} MiB "
              f"(reserve {reserve >> 20} MiB)")
        client.stdin.close()  # the attacker goes: its connections close, the waiting ones are accepted in turn
        client.wait(30)
        assert wait_until(lambda: host.sealer.gateways.connections("hold") == (0, 25), timeout=30), \
            host.sealer.gateways.connections("hold")
        assert wait_until(lambda: spooled(spool) == [])
        assert post(job.api_socket)[0].status == 200 and sink.bodies[-1][0] == len(messages_body())


def test_24_large_bodies_are_checked_one_at_a_time_and_forwarded_as_they_were_sent(host):
    reserve = Settings().reserve_memory
    with Sink() as sink:
        job = host.add_job("large", upstream(sink.base_url))
        assert post(job.api_socket)[0].status == 200
        before = rss()
        size = 24 * 1024 * 1024
        client = attack(job.api_socket, 24, "send", size, kind="string")
        out, _ = client.communicate(timeout=300)
        grown = rss() - before
        assert json.loads(out) == [200] * 24
        assert grown < reserve, f"the gateway's process grew {grown >> 20} MiB checking 24 bodies of 24 MiB"
        print(f"\nRSS growth checking 24 bodies of 24 MiB: {grown / 2**20:.1f} MiB (reserve {reserve >> 20} MiB)")
        head = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "%s"}]})
        a, b = head.encode().split(b"%s")
        expected = hashlib.sha256(a + b"Q" * (size - len(a) - len(b)) + b).hexdigest()
        assert sink.bodies[1:] == [(size, expected)] * 24  # byte for byte what the client sent


def test_a_body_whose_parse_could_exhaust_the_gateway_is_refused_unparsed(host):
    with ScriptedAPI() as api:
        job = host.add_job("amplify", upstream(api.base_url))
        for shape in (b"[" + b",".join([b"{}"] * 3_000_000) + b"]", b"[" + b",".join([b"0"] * 4_000_000) + b"]"):
            response, body = post(job.api_socket, shape)
            error = json.loads(body)["error"]
            assert (response.status, error["type"]) == (413, "request_too_large")
            assert "EXECUTOR_GATEWAY_PARSE_MEMORY" in error["message"]
        assert api.requests == []
        assert post(job.api_socket)[0].status == 200


def test_two_model_keys_at_any_depth_are_refused_before_the_upstream(host):
    other = "claude-opus-4-1"
    with ScriptedAPI() as api:
        job = host.add_job("dup", upstream(api.base_url))
        bodies = [
            f'{{"model": "{other}", "max_tokens": 5, "messages": [], "model": "{MODEL}"}}',  # what passed on main
            f'{{"model": "{MODEL}", "max_tokens": 5, "messages": [], "model": "{other}"}}',
            f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "a", "content": "b"}}]}}',
            f'{{"model": "{MODEL}", "metadata": {{"x": {{"y": [{{"z": 1, "z": 2}}]}}}}}}',
        ]
        big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 * IN_MEMORY)}]})
        bodies.append(big[:-1] + f', "model": "{other}"}}')  # spooled, checked by the parse thread
        for text in bodies:
            response, body = post(job.api_socket, text)
            error = json.loads(body)["error"]
            assert (response.status, error["type"]) == (400, "invalid_request_error"), text[:80]
            assert "twice in one object" in error["message"]
        assert api.requests == []  # the scripted upstream saw nothing
        assert post(job.api_socket)[0].status == 200 and len(api.requests) == 1


@pytest.mark.parametrize("name, body, says", [
    ("deep", b'{"model": "M", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    ("deep-inline", b'{"model": "M", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}", "nested deeper"),
    ("nan", b'{"model": "M", "max_tokens": NaN}', "NaN is not a JSON number"),
    ("infinity", b'{"model": "M", "t": -Infinity}', "-Infinity is not a JSON number"),
    ("nan-spooled", b'{"model": "M", "p": "' + b"y" * (2 * IN_MEMORY) + b'", "t": Infinity}', "Infinity"),
    ("bad-utf8", b'{"model": "M", "p": "\xff"}', "not valid UTF-8"),
    ("surrogate-utf8", b'{"model": "M", "p": "\xed\xa0\x80"}', "not valid UTF-8"),
    ("overlong", b'{"model": "M", "p": "\xc0\xaf"}', "not valid UTF-8"),
    ("trailing", b'{"model": "M"} {"model": "other"}', "not strict JSON"),
    ("control", b'{"model": "M", "p": "a\x01b"}', "not strict JSON"),
    ("huge-int", b'{"model": "M", "n": ' + b"9" * 5000 + b"}", "not strict JSON"),
])
def test_a_body_that_is_not_strict_json_is_400_and_the_gateway_keeps_serving(host, name, body, says):
    with ScriptedAPI() as api:
        job = host.add_job(f"strict-{name}", upstream(api.base_url))
        response, answer = post(job.api_socket, body.replace(b'"M"', f'"{MODEL}"'.encode()))
        error = json.loads(answer)["error"]
        assert (response.status, error["type"]) == (400, "invalid_request_error") and says in error["message"]
        assert api.requests == []
        assert wait_until(lambda: [r.kind for r in job.refusals] == ["body"])
        assert post(job.api_socket)[0].status == 200


def test_a_compressed_body_is_refused(host):
    with ScriptedAPI() as api:
        job = host.add_job("gzip", upstream(api.base_url))
        conn = UnixHTTPConnection(job.api_socket)
        conn.request("POST", "/v1/messages", messages_body(), {"content-encoding": "deflate"})
        response = conn.getresponse()
        assert response.status == 400 and b"must not be compressed" in response.read()
        conn.close()
        assert api.requests == []


def test_the_upstream_gets_the_very_bytes_that_were_checked(host):
    with Sink() as sink:
        job = host.add_job("exact", upstream(sink.base_url))
        small = ('{ "model" :"\\u0063laude-sonnet-4-5" ,"messages":[{"role":"user","content":"h\\u00e9\\ud83d\\ude00"}]'
                 ',"max_tokens":5}\n').encode()
        large = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "é" * IN_MEMORY}]}).encode()
        for body in (small, large):
            assert post(job.api_socket, body)[0].status == 200
        assert sink.bodies == [(len(body), hashlib.sha256(body).hexdigest()) for body in (small, large)]


def test_a_flooders_records_do_not_hold_up_a_quiet_jobs_close(host):
    """The recorder is inside the flooder's write (held there by the test, as a slow database would hold it);
    the quiet job's close still returns, with the quiet job's records written by the closing thread itself."""
    entered, release = threading.Event(), threading.Event()
    writers: dict[str, list[str]] = {"flood": [], "quiet": []}

    def writer(name: str, hold: bool):
        def write(batch):
            writers[name].append(threading.current_thread().name)
            if hold:
                entered.set()
                release.wait(60)
            return jobs[name].write(batch)
        return write

    jobs = {}
    with ScriptedAPI() as api:
        jobs["flood"] = host.add_job("flood", upstream(api.base_url), write=writer("flood", True))
        jobs["quiet"] = host.add_job("quiet", upstream(api.base_url), write=writer("quiet", False))
        flood, quiet = jobs["flood"], jobs["quiet"]
        conn = UnixHTTPConnection(flood.api_socket)
        for _ in range(3000):
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
        conn.close()
        assert entered.wait(10)  # the recorder thread is in the flooder's write, and stays there
        assert post(quiet.api_socket)[0].status == 200
        post(quiet.api_socket, messages_body(model="claude-opus-4-1"))
        host.remove_job(quiet)  # returns although the recorder is stuck in the flooder's batch
        assert not release.is_set() and host.sealer.recorder.pending("flood") > 0  # the flooder still waits
        assert [r.status for r in quiet.records] == [200] and [r.kind for r in quiet.refusals] == ["model"]
        assert set(writers["quiet"]) == {threading.current_thread().name}  # written by the closing thread
        release.set()
        host.remove_job(flood)
    # 3000 identical refusals: one event, its count updated to the end, not 3000 rows
    assert [r.kind for r in flood.refusals] == ["route"] and flood.counts("gateway_refused") == [3000]
    assert len(flood.batches) < 100


def test_past_the_cap_only_counts_are_recorded(host):
    with ScriptedAPI() as api:
        job = host.add_job("capped", upstream(api.base_url), egress=[], limits=SealLimits(event_cap=5))
        conn = UnixHTTPConnection(job.api_socket)
        for i in range(20):
            for _ in range(3):
                conn.request("GET", f"/v1/route-{i}")
                conn.getresponse().read()
        conn.close()
        for _ in range(4):  # egress denials count against the same cap
            tunnel = UnixHTTPConnection(job.egress_socket)
            tunnel.set_tunnel("example.org", 443)
            with pytest.raises(OSError, match="403"):
                tunnel.request("GET", "/")
            tunnel.close()
        host.remove_job(job)
    kinds = sorted(entry.kind for entry in job.events.values())
    assert kinds == ["gateway_refused"] * 5 + ["sealed_events_capped"]
    assert job.counts("gateway_refused") == [3] * 5
    capped = next(entry for entry in job.events.values() if entry.kind == "sealed_events_capped")
    assert capped.unrecorded == {"gateway_refused": 45, "egress": 4} and capped.count == 49


def test_egress_connections_past_the_limit_wait_and_identical_denials_are_one_event(host):
    job = host.add_job("egress-many", upstream("http://127.0.0.1:9"), limits=SealLimits(egress_connections=2))
    idle = [socket.socket(socket.AF_UNIX) for _ in range(5)]
    for s in idle:
        s.connect(str(job.egress_socket))  # say nothing: each holds its connection until its head timeout
    assert wait_until(lambda: host.sealer.proxies.connections("egress-many") == (2, 2))
    for s in idle:
        s.close()
    assert wait_until(lambda: host.sealer.proxies.connections("egress-many") == (0, 5))
    for _ in range(6):
        tunnel = UnixHTTPConnection(job.egress_socket)
        tunnel.set_tunnel("example.org", 443)
        with pytest.raises(OSError, match="403"):
            tunnel.request("GET", "/")
        tunnel.close()
    host.remove_job(job)
    assert [(e.host, e.status) for e in job.egress] == [("example.org", 403)]
    assert job.counts("egress") == [6]
