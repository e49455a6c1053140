#!/usr/bin/env python3
"""executor-forward: expose Unix sockets as loopback TCP ports inside a sandbox, then run a command.

    executor-forward 8080=/run/executor/api.sock 3128=/run/executor/egress.sock -- claude -p ...

Owns: listening on 127.0.0.1:PORT for each PORT=SOCKET pair *before* the command starts, and relaying
each accepted connection, both ways and half-close aware, to a fresh connection to SOCKET.

How: the listeners are bound in this process; then it forks a relay daemon (double fork, so the relay
is adopted by the container's init and the command has no stray child) and execs the command in its
own place. So the command keeps this process's PID, stdio and exit code, and the listeners already
queue connections while the relay starts. The relay exits when the command does (it watches a pidfd, or the pid where the kernel has no pidfd).
Only the relay imports asyncio (after the fork): the command starts ~35 ms sooner than if this did.

Must never: write to stdout (the command's stdout is parsed as JSON lines; the relay's stdout is
pointed at stderr), change the command's exit code, or do anything when a socket is missing but refuse
that one connection. If the relay dies, connections fail: the job is cut off, nothing else happens.
Python 3.11 standard library only: it is copied into the sandbox image.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys

EXIT_USAGE = 64  # EX_USAGE: bad arguments; the command was not started
EXIT_OSERR = 71  # EX_OSERR: a port could not be bound or the relay not started; the command was not run
EXIT_EXEC = 127  # the command could not be executed (as a shell reports it)
CHUNK = 64 * 1024
USAGE = "usage: executor-forward PORT=UNIX_SOCKET [PORT=UNIX_SOCKET ...] -- COMMAND [ARG ...]"


def say(message: str) -> None:
    print(f"executor-forward: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """((port, socket path) pairs, command) from the command line; ValueError says what is wrong."""
    if "--" not in argv:
        raise ValueError("missing '--' before the command")
    split = argv.index("--")
    specs, command = argv[:split], argv[split + 1:]
    if not specs or not command:
        raise ValueError("need at least one PORT=UNIX_SOCKET and a command")
    pairs = []
    for spec in specs:
        port, sep, path = spec.partition("=")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not path.startswith("/"):
            raise ValueError(f"{spec!r} is not PORT=/absolute/socket/path")
        pairs.append((int(port), path))
    return pairs, command


def bind_listeners(pairs: list[tuple[int, str]]) -> list[tuple[socket.socket, str]]:
    listeners = []
    for port, path in pairs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        listeners.append((sock, path))
    return listeners


# ------------------------------------------------------------------------------------------- relay


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (half-close): the other direction keeps flowing."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()  # a reset on one side becomes a reset on the other


async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, path: str) -> None:
    import asyncio

    try:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        say(f"cannot connect to {path}: {exc.strerror or exc}")
        client_writer.transport.abort()
        return
    try:
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))
    finally:
        client_writer.close()
        upstream_writer.close()


#: Seconds between looks at the command's pid where the kernel has no pidfd (gVisor's, 2022).
POLL_PID = 0.5


def command_handle(pid: int) -> int | None:
    """A pidfd naming the command's process, or None where the kernel has none (gVisor's ``runsc`` of 2022
    answers ENOSYS): the relay then looks at the pid itself."""
    try:
        return os.pidfd_open(pid)  # close-on-exec here; the command never holds it
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        return None


async def _pid_gone(pid: int) -> None:
    import asyncio

    # Only this container's processes are visible, and the command is the one that outlives the others
    # (its exit ends the container): a reused pid is not a concern.
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # it exists (as another user)
        await asyncio.sleep(POLL_PID)


async def serve(listeners: list[tuple[socket.socket, str]], command_pidfd: int | None, command_pid: int) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    for sock, path in listeners:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str = path) -> None:
            # No Nagle: each small write (an SSE event, a request head) leaves at once. (asyncio sets it
            # on TCP transports too; said here because the latency depends on it.)
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await relay(r, w, path)
        await asyncio.start_server(on_connect, sock=sock, limit=CHUNK)
    if command_pidfd is None:
        await _pid_gone(command_pid)
        return
    command_done = loop.create_future()
    # The pidfd becomes readable when the command exits: then there is nothing left to serve.
    loop.add_reader(command_pidfd, lambda: command_done.done() or command_done.set_result(None))
    await command_done


def run_relay(listeners: list[tuple[socket.socket, str]], command_pidfd: int | None, command_pid: int) -> None:
    """In the daemon: stdio away from the command's stdout, serve until the command exits."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # anything printed by mistake lands on stderr, never in the JSON stream
    os.close(devnull)
    try:
        import asyncio

        asyncio.run(serve(listeners, command_pidfd, command_pid))
    except Exception as exc:  # the relay's end must never surface as anything but failed connections
        say(f"relay stopped: {exc!r}")


def start_relay(listeners: list[tuple[socket.socket, str]]) -> None:
    """Double fork: the relay daemon is re-parented to init; this process goes on to exec the command."""
    command_pid = os.getpid()  # this process becomes the command
    pidfd = command_handle(command_pid)
    child = os.fork()
    if child == 0:
        try:
            os.setsid()  # out of the command's process group: terminal signals meant for it do not hit us
            if os.fork() == 0:
                run_relay(listeners, pidfd, command_pid)
        finally:
            os._exit(0)  # whatever happened, neither the middle child nor the relay may run the command
    if pidfd is not None:
        os.close(pidfd)
    os.waitpid(child, 0)


def main(argv: list[str]) -> int:
    try:
        pairs, command = parse_args(argv)
    except ValueError as exc:
        say(f"{exc}\n{USAGE}")
        return EXIT_USAGE
    try:
        listeners = bind_listeners(pairs)
        start_relay(listeners)
    except OSError as exc:
        say(f"cannot start: {exc}")
        return EXIT_OSERR
    for sock, _ in listeners:
        sock.close()  # the relay holds its own copies (ours are close-on-exec anyway)
    # Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: give the
    # command the defaults it would have had (as subprocess's restore_signals does), or `yes | head` breaks.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        say(f"cannot run {command[0]}: {exc.strerror or exc}")
        return EXIT_EXEC
    return EXIT_EXEC  # not reached: execvp returns only by raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
