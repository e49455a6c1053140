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

4. Hostile (``--hostile 1,4,8``): N hostile jobs, each with its gateway's every connection (and as many again
   waiting in the backlog) holding a body one byte short of 32 MiB, then each sending that many complete
   24 MiB bodies (checked one at a time, forwarded to a sink): this process's RSS growth (peak, sampled)
   per hostile job. And a quiet job's end (``Sealer.close``: its gateway and proxy stopped, its records
   written to a real SQLite store) beside a job flooding its gateway with refused requests, against alone.

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
    if mode == "hostile":
        hostile_client(target, int(argv[2]), argv[3], int(argv[4]))
    elif mode == "latency":
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
    def write(batch) -> list[int]:
        recorded.extend(batch.requests)
        return [0] * len(batch.new())

    hooks = Hooks(write=write, activity=lambda: None)
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


# ------------------------------------------------------------------------------------------- hostile


def hostile_client(path: str, count: int, mode: str, size: int) -> None:
    """``count`` connections to a gateway socket: "hold" sends a head and one byte short of a ``size`` body and
    holds on until stdin closes; "send" sends whole legitimate bodies (one large string) and prints statuses;
    "flood" sends refused requests until stdin closes and prints how many."""
    if mode == "flood":
        flood_client(path, count)
        return
    if mode == "hold":
        body = b"x" * size
    else:
        a, b = body_parts()
        body = a + b"Q" * (size - len(a) - len(b)) + b
    conns, statuses, connected = [], [], threading.Semaphore(0)

    def one() -> None:
        s = socket.socket(socket.AF_UNIX)
        conns.append(s)
        s.connect(path)
        connected.release()
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
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
        sys.stdin.read()
    else:
        for t in threads:
            t.join()
        print(json.dumps(statuses), flush=True)


def flood_client(path: str, count: int) -> None:
    stop, sent = threading.Event(), [0]

    def one(i: int) -> None:
        conn = UnixHTTPConnection(path)
        while not stop.is_set():
            conn.request("GET", f"/v1/models-{i}-{sent[0] % 500}")  # distinct ones too: the cap is reached
            conn.getresponse().read()
            sent[0] += 1
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join()
    print(sent[0], flush=True)


def body_parts() -> tuple[bytes, bytes]:
    head = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "%s"}]})
    a, b = head.encode().split(b"%s")
    return a, b


class PeakRSS:
    """This process's RSS, sampled every 20 ms in a thread: the peak since ``start``."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self.base = psutil.Process(), 0, 0
        self.stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def grown(self) -> float:
        return (self.peak - self.base) / 2**20


def spooled_bodies(directory: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/"):
                count += 1
        except OSError:
            continue
    return count


def hostile(args) -> None:
    from executor.sandbox.gateway import Upstream
    from executor.sandbox.seal import Hooks, Sealer, SealLimits
    from executor.settings import Settings
    from tests.sealing import Sink

    limits, reserve = SealLimits(), Settings().reserve_memory
    print(f"hostile jobs: each opens 2 x {limits.gateway_connections} connections to its gateway (the limit, "
          f"and as many waiting); reserve {reserve >> 20} MiB")
    for n in [int(x) for x in args.hostile.split(",")]:
        sealer = Sealer().start()
        tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
        hooks = Hooks(write=lambda batch: [0] * len(batch.new()), activity=lambda: None)
        with Sink() as sink:
            sockets = []
            for i in range(n):
                (tmp / f"j{i}").mkdir()
                upstream = Upstream(MODEL, "sk-real", base_url=sink.base_url)
                sealed = sealer.open(f"j{i}", tmp / f"j{i}" / "sock", upstream, [], os.getuid(), os.getgid(), hooks,
                                     limits)
                sockets.append(str(sealed.directory / "api.sock"))
            count = 2 * limits.gateway_connections
            with PeakRSS() as held:
                clients = [subprocess.Popen([sys.executable, __file__, "--client", "hostile", path, str(count), "hold",
                                             str(32 * 2**20)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                           for path in sockets]
                for client in clients:
                    client.stdout.readline()
                want = n * limits.gateway_connections
                while sum(spooled_bodies(tmp / f"j{i}" / "bodies") for i in range(n)) < want:
                    time.sleep(0.1)
                time.sleep(2)  # the last bytes of every accepted body reach its file
                for client in clients:
                    client.stdin.close()
                    client.wait()
            started = time.perf_counter()
            with PeakRSS() as checked:
                clients = [subprocess.Popen([sys.executable, __file__, "--client", "hostile", path,
                                             str(limits.gateway_connections), "send", str(24 * 2**20)],
                                            stdout=subprocess.PIPE, text=True) for path in sockets]
                statuses = [json.loads(client.communicate()[0]) for client in clients]
            elapsed = time.perf_counter() - started
            for i in range(n):
                sealer.close(f"j{i}")
        sealer.stop()
        ok = sum(s == 200 for row in statuses for s in row)
        print(f"  {n} hostile job(s): holding 32 MiB bodies +{held.grown:6.1f} MiB ({held.grown / n:5.1f} per job); "
              f"checking {n * limits.gateway_connections} bodies of 24 MiB +{checked.grown:6.1f} MiB "
              f"({ok} forwarded in {elapsed:.1f} s)")
    quiet_beside_flood()


def quiet_beside_flood() -> None:
    """Sealer.close of a quiet job (one answered request, one refusal), its records going to a real SQLite
    store, alone and while another job floods its gateway with refused requests."""
    from executor.sandbox.gateway import Upstream
    from executor.sandbox.journal import EGRESS, REFUSED
    from executor.sandbox.seal import Hooks, Sealer
    from executor.store import Job, Store
    from tests.scripted_api import ScriptedAPI

    tmp = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    store = Store(tmp / "executor.db")
    sealer = Sealer().start()

    def hooks(job_id: str) -> Hooks:
        job = Job(id=job_id, session_id=job_id, runner="r", model_requested=MODEL, workspace="/", prompt="p")

        def write(batch) -> list[int]:
            data = [(e.kind, {"count": e.count, "reason": getattr(e.first, "reason", None)}) for e in batch.new()]
            updates = [(e.event_id, {"count": e.count}) for e in batch.entries if e.event_id is not None]
            return store.add_sandbox_batch(job, 1, [], data, updates)
        return Hooks(write=write, activity=lambda: None)

    def quiet_close(name: str, api: ScriptedAPI) -> tuple[float, int]:
        (tmp / name).mkdir()
        sealed = sealer.open(name, tmp / name / "sock", Upstream(MODEL, "sk-real", base_url=api.base_url), [],
                             os.getuid(), os.getgid(), hooks(name))
        conn = UnixHTTPConnection(str(sealed.directory / "api.sock"))
        for model in (MODEL, "claude-opus-4-1"):
            conn.request("POST", "/v1/messages", body(False).replace(MODEL.encode(), model.encode()),
                         {"content-type": "application/json"})
            conn.getresponse().read()
        conn.close()
        started = time.perf_counter()
        sealer.close(name)
        return time.perf_counter() - started, len(store.events(job_id=name))

    with ScriptedAPI() as api:
        alone = [quiet_close(f"alone-{i}", api) for i in range(5)]
        (tmp / "flood").mkdir()
        flood = sealer.open("flood", tmp / "flood" / "sock", Upstream(MODEL, "sk-real", base_url=api.base_url), [],
                            os.getuid(), os.getgid(), hooks("flood"))
        flooder = subprocess.Popen([sys.executable, __file__, "--client", "hostile", str(flood.directory / "api.sock"),
                                    "4", "flood", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        beside = [quiet_close(f"beside-{i}", api) for i in range(5)]
        sent = int(flooder.communicate("")[0])
        started = time.perf_counter()
        sealer.close("flood")
        flood_close = time.perf_counter() - started
    sealer.stop()
    events = store.events(job_id="flood")
    counted = sum(e.data.get("count", 0) for e in events if e.kind in (REFUSED, EGRESS))
    capped = sum(e.data.get("count", 0) for e in events if e.kind == "sealed_events_capped")
    print(f"a quiet job's end (Sealer.close, its records in SQLite), median of 5: alone "
          f"{statistics.median(t for t, _ in alone) * 1000:.1f} ms, beside a job flooding its gateway "
          f"{statistics.median(t for t, _ in beside) * 1000:.1f} ms (max {max(t for t, _ in beside) * 1000:.1f})")
    print(f"  the flood: {sent} refused requests -> {len(events)} events (counts {counted} + {capped} past the "
          f"cap); its own close {flood_close * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--mb", type=int, default=32, help="size of the large streamed answer")
    parser.add_argument("--jobs", type=int, default=5, help="jobs of each kind end to end (0: skip)")
    parser.add_argument("--hostile", default="1,4,8", help="numbers of hostile jobs to measure ('': skip)")
    parser.add_argument("--only-hostile", action="store_true", help="run the hostile rows only")
    args = parser.parse_args()
    if args.only_hostile:
        hostile(args)
        return
    per_request(args)
    if args.hostile:
        hostile(args)
    if args.jobs:
        end_to_end(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2:])
    else:
        main()
