"""The app's async Redis connections (`LeanCommands`): commands packed by hiredis, the same
bytes as redis-py's own packer for every argument it accepts and the same refusal of what
it does not; a write bounded without a task per command, timing out as redis-py's does."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from app.settings import Settings
from app.stores.batch import as_dict, batch
from app.stores.clients import async_redis_client, lean

pytestmark = pytest.mark.anyio

ARGUMENTS = [
    ("SET", "k", "plain"),
    ("SET", "k", "é ü 中文"),
    ("SET", b"k", b"\x00\xff raw bytes\r\n"),
    ("SET", "k", 0),
    ("SET", "k", -17),
    ("SET", "k", 2**70),
    ("SET", "k", 1.5),
    ("SET", "k", 0.1),
    ("SET", "k", 1e20),
    ("SET", "k", float("inf")),
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", bytearray(b"array")),
    ("CONFIG GET", "maxmemory"),  # a name with a space is two arguments
    (b"CLIENT LIST",),
    ("XADD", "events:{x}:1", "MAXLEN", "~", 20000, "1-1", "event", "message.delta",
     "data", b'{"text":"hi"}'),
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=lambda a: " ".join(map(repr, a))[:40])
def test_hiredis_packing_gives_redis_py_bytes(args: tuple[object, ...]) -> None:
    python = Connection()
    fast = lean(Connection)()
    assert b"".join(fast.pack_command(*args)) == b"".join(python.pack_command(*args))


@pytest.mark.parametrize("bad", [None, True])
def test_hiredis_packing_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(redis.DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(redis.DataError):
        lean(Connection)().pack_command("SET", "k", bad)


def test_each_connection_class_gets_its_own_packing_subclass() -> None:
    tcp, unix = lean(Connection), lean(UnixDomainSocketConnection)
    assert tcp is lean(Connection)
    assert issubclass(tcp, Connection) and not issubclass(tcp, UnixDomainSocketConnection)
    assert issubclass(unix, UnixDomainSocketConnection)


async def test_async_client_round_trips_values_and_pipelines(settings: Settings) -> None:
    client = async_redis_client(settings.redis_url or "")
    key = f"test-clients:{uuid.uuid4().hex}"
    vector = np.arange(4, dtype=np.float32)
    try:
        assert client.connection_pool.connection_class.__name__.startswith("Lean")
        await client.hset(key, mapping={"text": "é", "n": 7, "x": 0.25,
                                        "vec": vector.tobytes()})
        pipe = client.pipeline(transaction=True)
        pipe.hget(key, "text").hget(key, "n").hget(key, "x").hget(key, "vec").expire(key, 60)
        text, n, x, vec, expired = await pipe.execute()
        assert (text.decode(), int(n), float(x), expired) == ("é", 7, 0.25, True)
        assert np.array_equal(np.frombuffer(vec, dtype=np.float32), vector)
        with pytest.raises(redis.DataError):
            await client.set(key, None)  # type: ignore[arg-type]
    finally:
        await client.delete(key)
        await client.aclose()


@pytest.fixture
def deaf_server() -> Iterator[int]:
    """A TCP server that accepts and never reads: a write to it fills the socket buffers
    and waits, as a write to a stalled Redis would."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    yield server.getsockname()[1]
    for s in held:
        s.close()
    server.close()


async def test_a_write_that_cannot_finish_fails_as_a_redis_timeout_in_time(
    deaf_server: int,
) -> None:
    client = async_redis_client(f"redis://127.0.0.1:{deaf_server}", socket_timeout=0.5,
                                driver_info=None)  # no CLIENT SETINFO handshake
    try:
        # Twice: the second proves the connection's bound is back after the first (an
        # unbounded write would hang here, so the test's own bound is 10 s).
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError, match="writing"):
                await asyncio.wait_for(client.set("k", b"x" * (64 << 20)), 10)
            assert time.monotonic() - started < 5
    finally:
        await client.aclose()


async def test_a_batch_answers_in_order_with_an_error_in_its_place_and_stays_in_step(
    settings: Settings,
) -> None:
    client = async_redis_client(settings.redis_url or "", max_connections=1)
    key = f"test-clients:{uuid.uuid4().hex}"
    try:
        await client.hset(key, mapping={"a": "1", "b": "é"})
        got = await batch(client, [("HMGET", key, "a", "b", "c"), ("INCR", key),
                                   ("HGETALL", key), ("GET", f"{key}:none")])
        assert got[0] == [b"1", "é".encode(), None]
        assert isinstance(got[1], redis.ResponseError) and "WRONGTYPE" in str(got[1])
        assert as_dict(got[2]) == {b"a": b"1", b"b": "é".encode()} and got[3] is None
        # One connection in the pool: the error's reply was read, so the next batch on
        # the same socket gets its own replies.
        assert await batch(client, [("HGET", key, "a"), ("EXISTS", key)]) == [b"1", 1]
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_batch_on_a_dropped_connection_fails_as_a_command_does_then_reconnects(
    settings: Settings,
) -> None:
    client = async_redis_client(settings.redis_url or "", max_connections=1)
    admin = redis.Redis.from_url(settings.redis_url or "")
    key = f"test-clients:{uuid.uuid4().hex}"
    try:
        await client.set(key, "v")
        [me] = await batch(client, [("CLIENT", "ID")])
        admin.client_kill_filter(_id=me)
        # The client has no retries (as `execute_command` on it): the caller sees the
        # drop, and the pool's connection is closed, not left half read.
        with pytest.raises(redis.ConnectionError):
            await batch(client, [("CLIENT", "ID"), ("GET", key)])
        [again, value] = await batch(client, [("CLIENT", "ID"), ("GET", key)])
        assert value == b"v" and again != me  # a new connection, the same answer
    finally:
        await client.delete(key)
        await client.aclose()
        admin.close()


async def test_a_batch_whose_replies_do_not_come_times_out_and_the_next_gets_its_own(
    settings: Settings,
) -> None:
    """The batch's one read bound: Redis paused past the client's socket_timeout, the
    batch fails as a read timeout in time, and the connection it held is not reused
    half read: the next batch on the one-connection pool gets its own replies."""
    client = async_redis_client(settings.redis_url or "", max_connections=1,
                                socket_timeout=0.3)
    admin = redis.Redis.from_url(settings.redis_url or "")
    key = f"test-clients:{uuid.uuid4().hex}"
    try:
        await client.set(key, "before")
        admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError, match="reading"):
            await batch(client, [("SET", key, "during"), ("GET", key)])
        assert time.monotonic() - started < 1.2  # the bound, not the pause, ended it
        admin.execute_command("CLIENT", "UNPAUSE")
        # A half-read connection would answer with the paused batch's replies (OK, ...).
        assert await batch(client, [("ECHO", "mine"), ("INCR", f"{key}:n")]) == [b"mine", 1]
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        await client.delete(key, f"{key}:n")
        await client.aclose()
        admin.close()
