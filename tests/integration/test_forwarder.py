"""``executor-forward`` (sandbox/forward.py) as a process on the host: it opens the loopback ports before the
command starts, relays each connection to its Unix socket (half-close aware), keeps the command's stdout
clean and its exit code, and refuses bad usage before running anything. The integration tier runs it as
a sealed container's command."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.scripted_api import ScriptedAPI
from tests.sealing import HostSide, free_port, messages_body, upstream, wait_until

FORWARD = Path(__file__).resolve().parents[2] / "sandbox" / "forward.py"


def run_forward(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FORWARD), *args], capture_output=True, timeout=timeout, check=False)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_command_keeps_its_exit_code_and_a_clean_stdout(tmp_path):
    path = tmp_path / "echo.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def echo_after_half_close():
        conn, _ = server.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(b"echo:" + data)  # only possible if the client's half-close came through
        conn.close()

    threading.Thread(target=echo_after_half_close, daemon=True).start()
    port = free_port()
    client = (f"import socket,sys; s=socket.create_connection(('127.0.0.1',{port})); s.sendall(b'ping');"
              "s.shutdown(socket.SHUT_WR); print(s.recv(100).decode(), file=sys.stderr)")
    done = run_forward(f"{port}={path}", "--", "sh", "-c", f'echo out; {sys.executable} -c "{client}"; exit 7')
    assert done.returncode == 7
    assert done.stdout == b"out\n"
    assert b"echo:ping" in done.stderr
    assert wait_until(lambda: not port_open(port))  # the relay ends with the command
    server.close()


def test_the_command_gets_default_signal_dispositions(tmp_path):
    done = run_forward(f"{free_port()}={tmp_path}/none.sock", "--", "grep", "SigIgn", "/proc/self/status")
    assert done.stdout.split() == [b"SigIgn:", b"0000000000000000"]  # SIGPIPE not inherited as ignored


def test_a_missing_socket_refuses_that_connection_only(tmp_path):
    port = free_port()
    probe = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ntry:\n"
             "    print('read', s.recv(10))\nexcept ConnectionResetError:\n    print('reset')\nprint('still here')")
    done = run_forward(f"{port}={tmp_path}/absent.sock", "--", sys.executable, "-c", probe)
    # cut off (a reset, or an EOF when the abort raced the read); the command goes on
    assert done.returncode == 0 and done.stdout in (b"reset\nstill here\n", b"read b''\nstill here\n")
    assert b"cannot connect to" in done.stderr


def test_bad_usage_and_a_busy_port_run_nothing():
    assert run_forward("8080", "--", "true").returncode == 64
    assert run_forward("8080=relative.sock", "--", "true").returncode == 64
    assert run_forward("8080=/x.sock", "true").returncode == 64
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_forward(f"{busy.getsockname()[1]}=/nonexistent.sock", "--", "sh", "-c", "echo ran")
    assert done.returncode == 71 and done.stdout == b""


def test_twenty_clients_at_once_through_forwarder_and_gateway():
    host = HostSide()
    try:
        with ScriptedAPI() as api:
            job = host.add_job("forward-many", upstream(api.base_url))
            port = free_port()
            forwarder = subprocess.Popen([sys.executable, str(FORWARD), f"{port}={job.api_socket}", "--",
                                          "sleep", "60"])
            assert wait_until(lambda: port_open(port))
            statuses: list[int] = []

            def client() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
                for _ in range(5):
                    conn.request("POST", "/v1/messages", messages_body(stream=True))
                    response = conn.getresponse()
                    response.read()
                    statuses.append(response.status)
                conn.close()

            clients = [threading.Thread(target=client) for _ in range(20)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            forwarder.kill()  # the command (sleep); the relay follows it
            forwarder.wait()
            assert statuses == [200] * 100, [r.error for r in job.records if r.error]
            assert wait_until(lambda: not port_open(port))
    finally:
        host.close()
