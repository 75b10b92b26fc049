"""The app's async Redis clients pack commands with hiredis: same bytes as redis-py's own
packer for every argument it accepts, the same refusal of what it does not."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from app.settings import Settings
from app.stores.clients import async_redis_client, with_hiredis_packing

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
    fast = with_hiredis_packing(Connection)()
    assert b"".join(fast.pack_command(*args)) == b"".join(python.pack_command(*args))


@pytest.mark.parametrize("bad", [None, True])
def test_hiredis_packing_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(redis.DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(redis.DataError):
        with_hiredis_packing(Connection)().pack_command("SET", "k", bad)


def test_each_connection_class_gets_its_own_packing_subclass() -> None:
    tcp, unix = with_hiredis_packing(Connection), with_hiredis_packing(UnixDomainSocketConnection)
    assert tcp is with_hiredis_packing(Connection)
    assert issubclass(tcp, Connection) and not issubclass(tcp, UnixDomainSocketConnection)
    assert issubclass(unix, UnixDomainSocketConnection)


async def test_async_client_round_trips_values_and_pipelines(settings: Settings) -> None:
    client = async_redis_client(settings.redis_url or "")
    key = f"test-clients:{uuid.uuid4().hex}"
    vector = np.arange(4, dtype=np.float32)
    try:
        assert client.connection_pool.connection_class.__name__.startswith("Hiredis")
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
