"""A primary of the session-plane cluster dies under a steady writer.

20 sessions take turns back to back (a user and an assistant message per turn,
through `Sessions.append`, the app's own path, with WAIT for one replica as the
app does on a cluster); one primary gets SIGKILL, its replica takes over, the
writer goes on. Then every session's history is read back and compared with
what was acknowledged: lost = acknowledged but absent, duplicated = present
more than once. Every failed append must be one the app answers with a clear
503 / `error` event (`app.errors.translate`), never a 500, and only in the
seconds of the switch. The cluster is this module's own, so the kills touch no
other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.cluster import RedisCluster

from app.errors import DependencyError, translate
from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stack.cluster import ClusterNode, EmbeddedCluster
from app.stores import keys
from app.stores.clients import async_session_redis_client

pytestmark = pytest.mark.anyio

SESSIONS = 20
BEFORE_KILL_SECONDS = 2.0
AFTER_KILL_SECONDS = 10.0
# Failed appends are allowed only this long after the kill: the node timeout
# (2 s), the election, and the client finding the new primary.
ERROR_WINDOW_SECONDS = 8.0
UNREPLICATED = "backbone_session_unreplicated_appends_total"


@pytest.fixture(scope="module")
def own_cluster(stack_settings: Settings) -> Iterator[EmbeddedCluster]:
    from tests.conftest import scratch

    with scratch("failover") as data_dir:
        cluster = EmbeddedCluster(Path(data_dir))
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


def _cluster_settings(stack_settings: Settings, cluster: EmbeddedCluster) -> Settings:
    import dataclasses

    return dataclasses.replace(stack_settings, session_redis_url=cluster.url,
                               session_redis_cluster=True)


@contextlib.asynccontextmanager
async def _store(settings: Settings, wait_timeout_ms: int = 500) -> AsyncIterator[Sessions]:
    redis = async_session_redis_client(settings)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=4, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    try:
        yield Sessions(redis, pool, 3600, wait_replicas=settings.session_wait_replicas,
                       wait_timeout_ms=wait_timeout_ms)
    finally:
        await pool.close()
        await redis.aclose()


def _replica_of(cluster: EmbeddedCluster, port: int) -> ClusterNode:
    for node in cluster.nodes:
        with contextlib.suppress(Exception), node.client() as c:
            repl = c.info("replication")
            if repl.get("role") == "slave" and int(repl.get("master_port", 0)) == port:
                return node
    raise AssertionError(f"no replica of {port}")


def _unreplicated() -> float:
    return REGISTRY.get_sample_value(UNREPLICATED) or 0.0


async def test_an_append_is_acknowledged_after_its_replica_has_it_and_counted_when_it_cannot(
    own_cluster: EmbeddedCluster, stack_settings: Settings, user: str
) -> None:
    settings = _cluster_settings(stack_settings, own_cluster)
    assert settings.session_wait_replicas == 1  # the default on a cluster
    async with _store(settings, wait_timeout_ms=300) as store:
        sid = await store.create(user)
        assert isinstance(store.redis, RedisCluster)
        owner = store.redis.get_node_from_key(keys.session(sid))
        assert owner is not None
        replica = _replica_of(own_cluster, owner.port)
        assert replica.process is not None

        before = _unreplicated()
        await store.append(sid, user, [messages.build(sid, 0, "user", "replicated")], 0)
        with replica.client() as c:  # the replica has it the moment the append returns
            c.execute_command("READONLY")
            held = c.execute_command("JSON.GET", keys.session(sid), "$[-1].content")
        assert "replicated" in str(held)
        assert _unreplicated() == before

        # A stopped replica cannot acknowledge: the append waits out the timeout,
        # is still acknowledged (it is applied on the primary) and is counted. A
        # WAIT sent on another connection than the write would return at once.
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await store.append(sid, user, [messages.build(sid, 1, "user", "alone")], 1)
            waited = time.monotonic() - started
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        assert waited >= 0.3
        assert _unreplicated() == before + 1
        texts = [m["content"] for m in (await store.load(sid, user)).messages]
        assert texts == ["replicated", "alone"]


async def _writer(
    store: Sessions, sid: str, user: str, stop: asyncio.Event,
    acked: list[str], errors: list[tuple[float, str]], gaps: list[float],
    unclear: list[str],
) -> None:
    seq, n = 0, 0
    last = time.monotonic()
    while not stop.is_set():
        text = f"{sid[:6]}-turn-{n}"
        batch = [messages.build(sid, seq, "user", text),
                 messages.build(sid, seq + 1, "assistant", f"re: {text}")]
        try:
            stored = await store.append(sid, user, batch, seq)
        except Exception as exc:  # the switch: count it, reload, go on
            errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:120]))
            if not isinstance(translate(exc), DependencyError):  # the app would answer 500
                unclear.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                seq = messages.next_seq((await store.load(sid, user)).messages)
            continue
        acked.extend(m["content"] for m in stored)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        seq = int(stored[-1]["seq"]) + 1
        n += 1


async def test_a_primary_killed_under_load_loses_and_duplicates_no_acknowledged_message(
    own_cluster: EmbeddedCluster, stack_settings: Settings, user: str
) -> None:
    settings = _cluster_settings(stack_settings, own_cluster)
    async with _store(settings) as store:
        sids = [await store.create(user) for _ in range(SESSIONS)]
        acked: dict[str, list[str]] = {sid: [] for sid in sids}
        errors: list[tuple[float, str]] = []
        unclear: list[str] = []
        gaps: list[float] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(
            _writer(store, sid, user, stop, acked[sid], errors, gaps, unclear))
            for sid in sids]
        await asyncio.sleep(BEFORE_KILL_SECONDS)
        victim = own_cluster.primaries()[0]
        before = sum(len(a) for a in acked.values())
        unreplicated = _unreplicated()
        killed_at = time.monotonic()
        victim.kill()
        await asyncio.sleep(AFTER_KILL_SECONDS)
        stop.set()
        await asyncio.gather(*tasks)
        after = sum(len(a) for a in acked.values()) - before

        lost = duplicated = 0
        for sid in sids:
            held = Counter(m["content"] for m in (await store.load(sid, user)).messages)
            lost += sum(1 for text in acked[sid] if held[text] == 0)
            duplicated += sum(c - 1 for c in held.values() if c > 1)
        late = [e for t, e in errors if not 0 <= t - killed_at <= ERROR_WINDOW_SECONDS]
        error_window = (max(t for t, _ in errors) - killed_at) if errors else 0.0
        print(f"\nfailover: acked {before} before the kill, {after} after; lost {lost}, "
              f"duplicated {duplicated}; {len(errors)} errors "
              f"({dict(Counter(e for _, e in errors))}) over {error_window:.1f} s "
              f"after the kill; longest wait for an ack {max(gaps):.1f} s; "
              f"unreplicated acks {_unreplicated() - unreplicated:.0f}")
        assert after > 0, "the writer did not go on after the failover"
        assert duplicated == 0
        assert lost == 0
        assert unclear == [], "failures the app would answer with a 500"
        assert late == [], f"failures outside the {ERROR_WINDOW_SECONDS} s of the switch"
        assert len(own_cluster.primaries()) == 3  # the replica took over
        assert all(keys.check_session_id(s) for s in sids)


async def test_on_a_single_redis_without_replicas_a_configured_wait_times_out_and_is_counted(
    stack_settings: Settings, user: str
) -> None:
    import dataclasses

    settings = dataclasses.replace(stack_settings, session_redis_wait_replicas=1)
    async with _store(settings, wait_timeout_ms=1000) as store:
        sid = await store.create(user)
        before = _unreplicated()
        started = time.monotonic()
        await store.append(sid, user, [messages.build(sid, 0, "user", "one")], 0)
        assert time.monotonic() - started >= 1.0
        # The next appends skip WAIT for a while (no replica to wait for) but count.
        started = time.monotonic()
        await store.append(sid, user, [messages.build(sid, 1, "user", "two")], 1)
        assert time.monotonic() - started < 1.0
        assert _unreplicated() == before + 2
        texts = [m["content"] for m in (await store.load(sid, user)).messages]
        assert texts == ["one", "two"]
