"""A TCP proxy in front of one Redis node that loses one reply on purpose.

Armed with a marker (bytes of a command, e.g. a script's SHA), it forwards the
next command holding the marker to Redis, waits for Redis's answer, and then
closes the client's connection instead of passing the answer on: the command
ran, and the client only sees a dropped connection. Everything else is passed
through untouched. It runs on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class ReplyDropper:
    upstream_host: str
    upstream_port: int
    armed: bytes | None = None
    dropped: int = 0  # replies Redis sent that the client never got
    server: asyncio.Server | None = field(default=None, init=False)

    @property
    def port(self) -> int:
        assert self.server is not None, "start() first"
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> ReplyDropper:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    def arm(self, marker: bytes) -> None:
        """Drop the reply to the next command that contains `marker` (once)."""
        self.armed = marker

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        drop_next = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed is not None and self.armed in data:
                    self.armed = None
                    drop_next.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if drop_next.is_set():
                    self.dropped += 1  # Redis answered: the command ran
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
