"""Benchmark: what the sealed sandbox's plumbing adds, per API call and per job.

Run by hand (as root, with the Docker engine up and the sandbox image built):

    .venv/bin/python bench/gateway.py [--requests 300] [--mb 32] [--jobs 5]

1. Per request: small non-streaming and streaming Messages calls, sequential on one kept-alive connection
   (as the CLI keeps one), over three paths to the scripted API on 127.0.0.1: direct (TCP), through the
   job's gateway socket, and through ``executor-forward`` (TCP on loopback, as the CLI inside sees it) plus
   the gateway. The client runs in its own process, as the CLI does; the gateway (the executor's sealer,
   its loop thread and recorder) and the scripted API share this one, as they would share the executor's.
   p50 and p99 of each, and what the sealed paths add to the direct one.
2. Throughput: one large streamed answer (``--mb`` MiB of text in 2048 deltas) over the same three paths,
   best of three.
3. End to end: ``--jobs`` jobs through the executor with a sealed policy and as many with ``network =
   "host"`` (unsealed, policy "open"), alternating, one at a time, the same two-turn script (a Write, then "Done."); the
   median of each job's run (finished_at - started_at: the agent container, its test gate, the commit), and
   what a bare container's start costs with network none against host (the sealed job's own network
   namespace, which any isolated network, bridge included, pays).

Must never: talk to anything but 127.0.0.1 and its own sockets, or run unbounded (fixed counts). Nothing
here asserts on timing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "claude-sonnet-4-5"
BIG_KEY = "BIG-STREAM"
FORWARD = ROOT / "sandbox" / "forward.py"
IMAGE = os.environ.get("EXECUTOR_SANDBOX_IMAGE", "executor-sandbox:latest")


# ---------------------------------------------------------------------------------- client process


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("gateway", timeout=60)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def connection(target: str) -> http.client.HTTPConnection:
    """``unix:/path`` or ``tcp:PORT`` on 127.0.0.1; one kept-alive connection."""
    kind, _, where = target.partition(":")
    if kind == "unix":
        return UnixHTTPConnection(where)
    return http.client.HTTPConnection("127.0.0.1", int(where), timeout=60)


def body(stream: bool, prompt: str = "hello") -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 64, "stream": stream, "tools": [{"name": "t"}],
                       "messages": [{"role": "user", "content": prompt}]}).encode()


def client_latencies(target: str, count: int, stream: bool) -> list[float]:
    conn = connection(target)
    payload = body(stream)
    headers = {"content-type": "application/json", "x-api-key": "sk-placeholder"}
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("POST", "/v1/messages?beta=true", payload, headers)
        response = conn.getresponse()
        response.read()
        timings.append(time.perf_counter() - started)
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}")
    conn.close()
    return timings


def client_throughput(target: str) -> dict:
    conn = connection(target)
    started = time.perf_counter()
    conn.request("POST", "/v1/messages", body(True, BIG_KEY), {"content-type": "application/json"})
    response = conn.getresponse()
    size = 0
    while chunk := response.read1(1 << 20):
        size += len(chunk)
    elapsed = time.perf_counter() - started
    conn.close()
    return {"bytes": size, "seconds": elapsed}


def client_main(argv: list[str]) -> None:
    mode, target = argv[0], argv[1]
    if mode == "latency":
        print(json.dumps(client_latencies(target, int(argv[2]), argv[3] == "stream")))
    else:
        print(json.dumps(client_throughput(target)))


def run_client(*args: str) -> object:
    done = subprocess.run([sys.executable, __file__, "--client", *args], capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout)


# --------------------------------------------------------------------------------- per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_forwarder(port: int, socket_path: Path) -> subprocess.Popen:
    # The forwarder's command is a sleep; killing it ends the relay too (it watches the command).
    proc = subprocess.Popen([sys.executable, str(FORWARD), f"{port}={socket_path}", "--", "sleep", "3600"])
    deadline = time.monotonic() + 5
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the forwarder did not listen")
        time.sleep(0.02)
    return proc


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def per_request(args) -> None:
    from executor.sandbox.gateway import Upstream
    from executor.sandbox.seal import Hooks, Sealer
    from tests import scripted_api
    from tests.scripted_api import ScriptedAPI, Turn

    scripted_api._Handler.disable_nagle_algorithm = True  # a real API server does not wait on Nagle
    big = Turn.slow_text("x" * (args.mb * 1024 * 1024), chunks=2048, interval=0)
    sealer = Sealer().start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    recorded: list = []
    hooks = Hooks(request=recorded.append, refusal=lambda r: None, egress=lambda e: None, activity=lambda: None)
    with ScriptedAPI({BIG_KEY: [big] * 10}) as api:
        sealed = sealer.open("bench", tmp / "sock", Upstream(MODEL, "sk-real", base_url=api.base_url), [],
                             os.getuid(), os.getgid(), hooks)
        sock = sealed.directory / "api.sock"
        port = free_port()
        forwarder = start_forwarder(port, sock)
        try:
            paths = {"direct": f"tcp:{api.base_url.rsplit(':', 1)[1]}", "gateway": f"unix:{sock}",
                     "forward+gateway": f"tcp:{port}"}
            print(f"per request: {args.requests} sequential requests per row on one kept-alive connection; "
                  f"client in its own process; {os.cpu_count()} CPUs")
            for stream in (False, True):
                kind = "streaming" if stream else "non-streaming"
                base = None
                for name, target in paths.items():
                    run_client("latency", target, "10", "stream" if stream else "json")  # warm-up
                    p50, p99 = percentiles(run_client("latency", target, str(args.requests),
                                                      "stream" if stream else "json"))
                    extra = "" if base is None else f"   added p50 {p50 - base[0]:+.2f} ms, p99 {p99 - base[1]:+.2f} ms"
                    base = base or (p50, p99)
                    print(f"  {kind:14} {name:16} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms{extra}")
            print(f"throughput: one streamed answer of ~{args.mb} MiB in 2048 deltas, best of 3")
            for name, target in paths.items():
                best = max((run_client("throughput", target) for _ in range(3)),
                           key=lambda r: r["bytes"] / r["seconds"])
                print(f"  {name:16} {best['bytes'] / best['seconds'] / 1e6:7.1f} MB/s "
                      f"({best['bytes'] / 1e6:.1f} MB in {best['seconds']:.2f} s)")
        finally:
            forwarder.kill()
            forwarder.wait()
            sealer.close("bench")
    sealer.stop()
    print(f"  (the gateway recorded {len(recorded)} requests)")


# ----------------------------------------------------------------------------------- end to end


def end_to_end(args) -> None:
    import docker

    from executor.intake.spool import Spool
    from executor.scheduling.service import Executor
    from executor.settings import Settings
    from executor.store import TERMINAL, Store
    from tests.scripted_api import ScriptedAPI, Turn

    base = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    home, policies, repos = base / "home", base / "policies", base / "repos"
    for d in (home, policies, repos):
        d.mkdir(parents=True)
    ids = [f"{mode}-{i}" for i in range(args.jobs) for mode in ("sealed", "open")]  # open: unsealed
    script = {job_id: [Turn.tool("Write", {"file_path": "/workspace/out.txt", "content": f"{job_id}\n"}),
                       Turn.text("Done.")] for job_id in ids}
    with ScriptedAPI(script) as api:
        (policies / "runners.toml").write_text(textwrap.dedent(f"""
            [runners.bench]
            model = "{MODEL}"
            auth_env = "BENCH_TOKEN"
            base_url = "{api.base_url}"
        """))
        common = 'cpus = 1.0\nmemory = "1g"\ntest_command = "test -f out.txt"\n'
        (policies / "sealed.toml").write_text(common + 'network = "sealed"\n')
        (policies / "open.toml").write_text(common + 'network = "host"\n')
        settings = Settings(home=home, policies=policies, workspace_roots=[repos], sandbox_image=IMAGE,
                            poll_interval=0.1, result_grace=5.0)
        executor = Executor(settings, {"BENCH_TOKEN": "sk-bench"}, docker.from_env(timeout=120))
        stop = threading.Event()
        server = threading.Thread(target=executor.serve, args=(stop,), daemon=True)
        server.start()
        try:
            spool = Spool(home / "spool")
            for job_id in ids:  # one at a time: nothing but the plumbing differs between the two
                repo = repos / job_id
                repo.mkdir()
                os.chown(repo, 1000, 1000)
                time.sleep(0.05)
                spool.write(json.dumps({"id": job_id, "runner": "bench", "workspace": str(repo),
                                        "policy": job_id.split("-")[0], "prompt": f"{job_id}: write"}).encode())
                while (job := executor.store.get(job_id)) is None or job.status not in TERMINAL:
                    time.sleep(0.1)
                if job.status.value != "succeeded":
                    raise SystemExit(f"{job_id} {job.status.value}: {job.error}")
        finally:
            stop.set()
            server.join(timeout=120)
    runs: dict[str, list[float]] = {"sealed": [], "open": []}
    store = Store(settings.db_path)
    for job_id in ids:
        job = store.get(job_id)
        runs[job_id.split("-")[0]].append((job.finished_at - job.started_at).total_seconds())
    print(f"end to end: {args.jobs} jobs each, alternating, one at a time (agent container, test gate, commit)")
    for mode, values in runs.items():
        label = "sealed" if mode == "sealed" else "unsealed"
        print(f"  {label:9} median {statistics.median(values):5.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    print(f"  sealed - unsealed: {statistics.median(runs['sealed']) - statistics.median(runs['open']):+.2f} s")
    client = docker.from_env(timeout=120)
    starts = {mode: statistics.median(container_start(client, mode) for _ in range(5)) for mode in ("none", "host")}
    extra = starts["none"] - starts["host"]
    print(f"  of which the network namespace: `docker run true` with network none {starts['none']:.3f} s, host "
          f"{starts['host']:.3f} s ({extra:+.3f} s; any isolated network pays it, bridge too)")


def container_start(client, network: str) -> float:
    started = time.perf_counter()
    container = client.containers.run(IMAGE, ["true"], detach=True, network_mode=network, user="1000:1000",
                                      init=True, read_only=True)
    container.wait()
    elapsed = time.perf_counter() - started
    container.remove(force=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--mb", type=int, default=32, help="size of the large streamed answer")
    parser.add_argument("--jobs", type=int, default=5, help="jobs of each kind end to end (0: skip)")
    args = parser.parse_args()
    per_request(args)
    if args.jobs:
        end_to_end(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2:])
    else:
        main()
