"""The event loop `backbone serve` runs: uvloop, accepting every waiting connection at once.

uvloop's libuv (1.45+) accepts one connection each time the listening socket is
readable, that is once per loop iteration, so that one listener cannot starve
the rest of a loop. Under load an iteration runs every event the open streams
produced, tens of milliseconds, so a burst of new clients waited in the
kernel's accept queue at 15-50 accepts a second: at 1,000 chats asking at
once, 3.4 s median and 9 s p99 between a client's connect and the app seeing
its request, while the app spent a few ms per request once it saw it
(docs/benchmarks.md, the 1,000-chat table). asyncio's own loop accepts up to
the backlog per readiness, which is what this does on uvloop: the TCP servers
uvicorn creates are listened to with `add_reader`, each readiness accepts
every waiting connection (up to the backlog), and uvloop's
`connect_accepted_socket` runs each on a transport as its own server would
(TCP_NODELAY set, the same protocol factory).

Unix sockets and TLS keep uvloop's own server.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

log = logging.getLogger("backbone.serve")

# Out of descriptors or memory: stop accepting for this long, as asyncio does,
# instead of spinning on a socket that stays readable.
ACCEPT_RETRY_SECONDS = 1.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptingLoop(uvloop.Loop):
    """uvloop, whose plain TCP servers accept all waiting connections per readiness."""

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
        port: Any = None, *, sock: socket.socket | None = None, backlog: int = 100,
        ssl: Any = None, reuse_address: bool | None = None, **kw: Any,
    ) -> Any:
        if ssl is not None or kw:  # TLS and the rarer options: uvloop's own server
            return await super().create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                reuse_address=reuse_address, **kw)
        if sock is not None:
            sockets = [sock]
        else:
            sockets = await self._bind(host, port)
        return AcceptingServer(self, protocol_factory, sockets, backlog)

    async def _bind(self, host: Any, port: Any) -> list[socket.socket]:
        """One listening socket per address `host` resolves to, bound as asyncio binds
        (SO_REUSEADDR, IPv6 sockets v6-only); an OSError names the address."""
        hosts = [host] if host is None or isinstance(host, str) else list(host)
        infos = []
        for h in hosts:
            infos += await self.getaddrinfo(h, port, family=socket.AF_UNSPEC,
                                            type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as e:
                    raise OSError(e.errno, f"error while attempting to bind on address "
                                           f"{address!r}: {(e.strerror or '').lower()}") from None
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets


class AcceptingServer:
    """What uvicorn needs of an asyncio Server (`sockets`, `close`, `wait_closed`),
    listening with `add_reader` and accepting up to `backlog` connections at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 sockets: Iterable[socket.socket], backlog: int) -> None:
        self._loop = loop
        self._factory = protocol_factory
        self._backlog = max(backlog, 1)
        self._sockets = list(sockets)
        self._connecting: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        for sock in self._sockets:
            sock.setblocking(False)
            sock.listen(self._backlog)
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._backlog):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return  # every waiting connection taken
            except ConnectionAbortedError:
                continue  # the client gave up while waiting: the next one
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("not accepting connections for %.0f s: %s", ACCEPT_RETRY_SECONDS, e)
                self._loop.remove_reader(listening.fileno())
                self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, listening)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _resume(self, listening: socket.socket) -> None:
        if not self._closed.is_set():
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as e:  # the peer already went away, say
            log.debug("accepted connection dropped before it started: %s", e)
            conn.close()

    def close(self) -> None:
        """Stop accepting (connections already accepted go on, as with asyncio's)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
