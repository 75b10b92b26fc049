"""Connections to Redis and PostgreSQL, and the start-up checks on them.

`check_modules` is what turns "this Redis has no search module" into one clear
sentence at start, instead of a stack trace from the first FT command.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import hiredis
import psycopg
import redis
import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool

from app.errors import DatabaseUnavailable, MissingModules, RedisUnavailable
from app.ops import metrics
from app.settings import Settings

# MODULE LIST name -> (minimum version as the module reports it, what it gives us)
REQUIRED_MODULES: dict[str, tuple[int, str]] = {
    "search": (20600, "the query engine (RediSearch 2.6+: FT.CREATE with HNSW vectors)"),
    "ReJSON": (20400, "JSON (RedisJSON 2.4+: JSON.SET, JSON.ARRAPPEND)"),
}

HOW_TO_GET_THEM = (
    "Use Redis Stack (redis/redis-stack-server), Redis 8 built with the query engine and "
    "JSON, or unset REDIS_URL to use the embedded default (make run)."
)


def redis_client(url: str, **kw: Any) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30, **kw)


# redis-py's async pool refuses a command once 100 connections are busy ("Too many
# connections"), which under a few hundred concurrent streams turned into 503s. A
# blocking pool makes the 257th caller wait for a free connection instead.
MAX_CONNECTIONS = 256
POOL_WAIT_SECONDS = 10.0


class LeanCommands:
    """Two costs redis-py's async connections pay per command, taken off.

    - Packing: its sync connections pack with hiredis (C), its async ones in Python;
      that was a third of an event-log XADD's client CPU (bench/event_log.py). Same
      bytes for every argument type redis-py accepts; what it refuses (None, a bool)
      is still a DataError.
    - The write's timeout: it bounds a write with `asyncio.wait_for`, which on
      Python 3.11 runs the write as a Task of its own, 20-40 µs a round trip. Here
      the same bound is an `asyncio.timeout` around redis-py's own send (run with
      the timeout unset, so it writes inline), and a write that outlasts it is the
      same `redis.TimeoutError`, the connection dropped as redis-py drops it. A
      write that cannot wait (`_write_cannot_wait`: almost every one) needs no bound.
    """

    socket_timeout: float | None

    def pack_command(self, *args: Any) -> list[bytes]:
        # A command name with spaces ("CONFIG GET") is several arguments, as redis-py does.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as e:  # a bytearray (hiredis takes bytes and memoryview), or bad input
            if not any(isinstance(a, bytearray) for a in args):
                raise redis.DataError(str(e)) from e
        packable = tuple(bytes(a) if isinstance(a, bytearray) else a for a in args)
        try:
            return [hiredis.pack_command(packable)]  # type: ignore[arg-type]  # stub: 1-tuple
        except TypeError as e:
            raise redis.DataError(str(e)) from e

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            return await super().send_packed_command(command, check_health)  # type: ignore[misc, no-any-return]
        # A connection serves one caller at a time (the pool hands it out), so unsetting
        # its timeout for this one send is seen by no one else.
        self.socket_timeout = None
        try:
            if self._write_cannot_wait(command, check_health):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
            else:
                async with asyncio.timeout(timeout):
                    await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:  # asyncio's, from this bound (redis-py's is no TimeoutError)
            raise redis.TimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout

    def _write_cannot_wait(self, command: Any, check_health: bool) -> bool:
        """True when sending `command` cannot wait, so needs no bound (4 µs a send):
        connected, no health-check PING due, an empty write buffer (so the transport
        is not paused) and a command below its high-water mark (so writing it does not
        pause it): the write is handed to the transport and `drain` returns at once."""
        writer: Any = getattr(self, "_writer", None)
        if writer is None or not self.is_connected:  # type: ignore[attr-defined]
            return False
        interval = self.health_check_interval  # type: ignore[attr-defined]
        if check_health and interval and (
            asyncio.get_running_loop().time() > self.next_health_check  # type: ignore[attr-defined]
        ):
            return False
        transport = writer.transport
        try:
            if transport.is_closing() or transport.get_write_buffer_size():
                return False
            high = transport.get_write_buffer_limits()[1]
        except (AttributeError, NotImplementedError):  # a transport that cannot say: bound it
            return False
        size = len(command) if isinstance(command, bytes | str) else sum(map(len, command))
        return bool(size < high)


_lean: dict[type, type] = {}


def lean(cls: type) -> type:
    """`cls` (an async connection class: TCP, TLS or unix socket) with `LeanCommands`."""
    if cls not in _lean:
        _lean[cls] = type(f"Lean{cls.__name__}", (LeanCommands, cls), {})
    return _lean[cls]


class MeteredPool(aredis.BlockingConnectionPool):
    """A blocking pool that counts the time commands wait for a free connection
    (`backbone_redis_pool_wait_seconds{pool}`): only a full pool is timed, so a
    command that finds a connection pays one length check."""

    name = "requests"

    async def get_connection(self, *args: Any, **kw: Any) -> Any:
        if self.can_get_connection():
            return await super().get_connection(*args, **kw)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        try:
            return await super().get_connection(*args, **kw)  # type: ignore[no-untyped-call]
        finally:
            metrics.REDIS_POOL_WAIT.labels(self.name).inc(time.perf_counter() - started)


def async_redis_client(
    url: str, max_connections: int = MAX_CONNECTIONS, *, pool_name: str = "requests", **kw: Any
) -> aredis.Redis:
    pool = MeteredPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_SECONDS,
        health_check_interval=30, **kw,
    )
    pool.name = pool_name
    pool.connection_class = lean(pool.connection_class)
    return aredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


class MeteredPgPool(AsyncConnectionPool[Any]):
    """The app's PostgreSQL pool, counting the time spent getting a connection
    (`backbone_pg_pool_wait_seconds`): near zero unless every connection is busy."""

    async def getconn(self, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            return await super().getconn(timeout)
        finally:
            metrics.PG_POOL_WAIT.inc(time.perf_counter() - started)


# MODULE LIST is @dangerous, so a least-privilege ACL user (deploy/redis/users.acl)
# may not run it: then each module is probed with a harmless command on a key the
# user may touch, and a module that answers counts as present at its minimum version.
PROBES: dict[str, tuple[str, ...]] = {
    "search": ("FT._LIST",),
    "ReJSON": ("JSON.TYPE", "session:{00000000000000000000000000000000}"),
}


def module_versions(client: redis.Redis) -> dict[str, int]:
    try:
        return parse_module_list(client.module_list())
    except redis.ResponseError:
        found: dict[str, int] = {}
        for name, probe in PROBES.items():
            try:
                client.execute_command(*probe)  # type: ignore[no-untyped-call]
                found[name] = REQUIRED_MODULES[name][0]
            except redis.ResponseError:
                pass
        return found


async def async_module_versions(client: aredis.Redis) -> dict[str, int]:
    """`module_versions` on an async client (for /readyz)."""
    try:
        return parse_module_list(await client.module_list())
    except redis.ResponseError:
        found: dict[str, int] = {}
        for name, probe in PROBES.items():
            try:
                await client.execute_command(*probe)  # type: ignore[no-untyped-call]
                found[name] = REQUIRED_MODULES[name][0]
            except redis.ResponseError:
                pass
        return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_module_list(rows: list[dict[Any, Any]]) -> dict[str, int]:
    """MODULE LIST reply (bytes or str keys) -> {name: version}."""
    versions: dict[str, int] = {}
    for row in rows:
        fields = {_text(k): v for k, v in row.items()}
        versions[_text(fields["name"])] = int(fields["ver"])
    return versions


def check_modules(client: redis.Redis) -> dict[str, int]:
    """The versions of the required modules; MissingModules names any absent or too old."""
    try:
        versions = module_versions(client)
    except redis.ConnectionError as e:
        raise RedisUnavailable(f"cannot reach Redis: {e}") from e
    problems = []
    for name, (minimum, what) in REQUIRED_MODULES.items():
        have = versions.get(name)
        if have is None:
            problems.append(f"module '{name}' is missing: {what}")
        elif have < minimum:
            problems.append(f"module '{name}' is version {have}, need {minimum}+: {what}")
    if problems:
        raise MissingModules("This Redis cannot serve redis-backbone: " + "; ".join(problems)
                             + ". " + HOW_TO_GET_THEM)
    return versions


def pg_connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=5, **kw)
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL: {e}") from e


# -- the session plane ----------------------------------------------------------
#
# Per-session and per-user keys go to SESSION_REDIS_URL when it is set (a single
# node, or a Redis Cluster with SESSION_REDIS_CLUSTER=1), else to REDIS_URL. The
# cluster clients are handed back typed as `Redis`: redis-py's RedisCluster has
# the same command methods (and cluster pipelines) for everything the session
# code calls, and every multi-key command and script there stays in one slot
# (`{<sid>}` / `{<uid>}` hash tags; tests/test_cluster_slots.py).


def session_redis_client(settings: Settings) -> redis.Redis:
    """The sync session-plane client (workers, benches)."""
    url = settings.session_redis_url or settings.redis_url or ""
    if settings.session_redis_cluster:
        return cast(redis.Redis, redis.RedisCluster.from_url(url, health_check_interval=30))
    return redis_client(url)


def async_session_redis_client(
    settings: Settings, *, main: aredis.Redis | None = None
) -> aredis.Redis:
    """The async session-plane client; `main` (the REDIS_URL client) is reused when
    the session plane is that same Redis."""
    if settings.session_redis_url is None and main is not None:
        return main
    url = settings.session_redis_url or settings.redis_url or ""
    if settings.session_redis_cluster:
        # max_connections is per node here; the cluster client waits for a free one.
        client = aredis.RedisCluster.from_url(
            url, max_connections=MAX_CONNECTIONS, health_check_interval=30,
        )
        return cast(aredis.Redis, client)
    return async_redis_client(url, pool_name="sessions")


_CLUSTER_TYPES: dict[type, bool] = {}


def is_cluster(client: object) -> bool:
    # By type, remembered: isinstance against the cluster classes takes ~1 µs, and
    # every batch (a dozen a turn) asks.
    kind = type(client)
    known = _CLUSTER_TYPES.get(kind)
    if known is None:
        known = _CLUSTER_TYPES[kind] = isinstance(client, (redis.RedisCluster, aredis.RedisCluster))
    return known


def async_session_reader_client(settings: Settings) -> aredis.Redis:
    """A session-plane client of its own for blocking reads (a resumed stream's XREAD),
    sized MAX_STREAMS_PER_NODE: the node admits no more streams than it has readers,
    so a reader never waits for a connection, and however many streams sit idle in
    XREAD they never hold one the request path needs (that pool is apart)."""
    url = settings.session_redis_url or settings.redis_url or ""
    size = settings.max_streams_per_node
    if settings.session_redis_cluster:
        client = aredis.RedisCluster.from_url(url, max_connections=size, health_check_interval=30)
        return cast(aredis.Redis, client)
    return async_redis_client(url, max_connections=size, pool_name="readers")
