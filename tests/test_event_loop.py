"""The serve loop accepts a burst of connections at once, however busy it is.

uvloop's own server accepts one connection per loop iteration; under load an
iteration takes tens of milliseconds, so 1,000 chats asking at once waited
seconds in the kernel's accept queue (app.ops.event_loop). These run the loop
`backbone serve` runs, count its iterations with a callback that re-schedules
itself, and open connections that wait in the accept queue before the loop
looks at the socket.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from uvicorn.importer import import_from_string

from app.cli import SERVE_LOOP
from app.ops.event_loop import AcceptingLoop, AcceptingServer

BURST = 200


class Recorder(asyncio.Protocol):
    made: list[asyncio.Transport]

    def connection_made(self, transport: Any) -> None:
        self.made.append(transport)


async def burst_iterations(loop: asyncio.AbstractEventLoop) -> int:
    """Loop iterations between a burst of BURST waiting connections and the last accepted."""
    made: list[asyncio.Transport] = []
    server = await loop.create_server(lambda: _recorder(made), "127.0.0.1", 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    # Blocking connects from the loop's own thread: the kernel completes each
    # handshake into the accept queue while the loop cannot look at the socket.
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]
    iterations = 0

    def tick() -> None:
        nonlocal iterations
        iterations += 1
        if len(made) < BURST:
            loop.call_soon(tick)

    loop.call_soon(tick)
    try:
        async with asyncio.timeout(30):
            while len(made) < BURST:
                await asyncio.sleep(0)
        return iterations
    finally:
        for transport in made:
            transport.close()
        for c in clients:
            c.close()
        server.close()
        await server.wait_closed()


def _recorder(made: list[asyncio.Transport]) -> Recorder:
    r = Recorder()
    r.made = made
    return r


def run_on(factory: Callable[[], asyncio.AbstractEventLoop],
           main: Callable[[asyncio.AbstractEventLoop], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main(runner.get_loop()))


def test_serve_runs_the_accepting_loop() -> None:
    assert import_from_string(SERVE_LOOP) is AcceptingLoop  # as uvicorn resolves it


def test_a_burst_of_waiting_connections_is_accepted_in_one_or_two_iterations() -> None:
    assert run_on(AcceptingLoop, burst_iterations) <= 3


def test_uvloops_own_server_takes_an_iteration_per_connection() -> None:
    # Why app.ops.event_loop exists: if uvloop ever accepts in batches again, it can go.
    assert run_on(uvloop.new_event_loop, burst_iterations) >= BURST // 2


def test_connections_get_a_transport_with_nodelay_and_echo_bytes() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> bytes:
        class Echo(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                sock = transport.get_extra_info("socket")
                nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                transport.write(b"nodelay=%d;" % bool(nodelay))

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)
                self.transport.close()

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        got = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return got

    assert run_on(AcceptingLoop, main) == b"nodelay=1;ping"


def test_a_closed_server_refuses_new_connections_and_keeps_accepted_ones() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        made: list[asyncio.Transport] = []
        server = await loop.create_server(lambda: _recorder(made), "127.0.0.1", 0)
        assert isinstance(server, AcceptingServer)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            while not made:
                await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        assert not made[0].is_closing()  # the accepted one goes on
        made[0].close()
        writer.close()

    run_on(AcceptingLoop, main)


def test_a_taken_port_is_an_oserror_naming_the_address() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        try:
            with pytest.raises(OSError, match=rf"127\.0\.0\.1.*{port}"):
                await loop.create_server(asyncio.Protocol, "127.0.0.1", port)
        finally:
            taken.close()

    run_on(AcceptingLoop, main)


EMFILE_SERVER = r"""
import asyncio, logging, os, resource, sys
from app.ops.event_loop import AcceptingLoop

logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(message)s")

class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(b"ok")
        self.transport.close()

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    # A few descriptors more than this process has open: the burst runs out of them.
    opened = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 4, hard))
    await asyncio.sleep(60)

with asyncio.Runner(loop_factory=AcceptingLoop) as runner:
    runner.run(main())
"""


def test_out_of_descriptors_it_pauses_accepting_and_then_serves_the_rest() -> None:
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        # More clients than the server has descriptors left; each asks once.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        for c in clients:
            c.sendall(b"?")
        started = time.monotonic()
        answers = []
        for c in clients:
            c.settimeout(20)
            answers.append(c.recv(2))
            c.close()
        assert answers == [b"ok"] * 12  # every one served, the late ones after the pause
        assert time.monotonic() - started >= 0.9  # at least one pause of ACCEPT_RETRY_SECONDS
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert "not accepting connections for 1 s" in err
    assert "Too many open files" in err
