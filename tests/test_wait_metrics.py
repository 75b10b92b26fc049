"""Where a request waits rather than works is counted (bench/sse_load.py prints it).

Each counter is driven by a real wait: a Redis pool of one connection held by a
blocking read, a PostgreSQL pool of one held by an open transaction, texts
queued behind an embedding batch, and an event loop blocked by a callback.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from app.embeddings import shared_embedder
from app.ops import metrics
from app.settings import Settings
from app.stores.clients import MeteredPgPool, async_redis_client

pytestmark = pytest.mark.anyio


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


REDIS_WAIT = "backbone_redis_pool_wait_seconds_total"
PG_WAIT = "backbone_pg_pool_wait_seconds_total"
EMBED_WAIT = "backbone_embed_wait_seconds_total"
LAG = "backbone_event_loop_lag_seconds_sum"


async def test_a_command_waiting_for_a_full_redis_pool_is_counted_under_its_pool(
    settings: Settings,
) -> None:
    client = async_redis_client(settings.redis_url or "", max_connections=1,
                                pool_name="test-pool")
    try:
        await client.ping()  # a free connection: nothing counted
        assert counted(REDIS_WAIT, pool="test-pool") == 0
        blocked = asyncio.create_task(client.blpop(["wait-metrics:{nothing}"], timeout=0.3))
        await asyncio.sleep(0.05)  # the one connection is in BLPOP now
        await client.ping()  # waits for it
        await blocked
        assert 0.15 < counted(REDIS_WAIT, pool="test-pool") < 5
    finally:
        await client.aclose()


async def test_getting_a_postgresql_connection_is_counted_with_its_wait(
    settings: Settings,
) -> None:
    pool = MeteredPgPool(settings.database_url or "", min_size=1, max_size=1, open=False)
    await pool.open(wait=True)
    try:
        before = counted(PG_WAIT)

        async def hold() -> None:
            async with pool.connection():
                await asyncio.sleep(0.3)

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.05)
        async with pool.connection() as conn:  # waits for the holder
            await conn.execute("SELECT 1")
        await holder
        assert 0.15 < counted(PG_WAIT) - before < 5
    finally:
        await pool.close()


async def test_texts_queued_behind_an_embedding_batch_count_their_wait() -> None:
    embedder = shared_embedder()
    await embedder.awarm()
    before = counted(EMBED_WAIT)
    texts = [f"wait metrics sentence number {i} {time.time()}" for i in range(40)]
    await asyncio.gather(*(embedder.aembed(t) for t in texts))
    # Each text waited from its arrival to the start of its batch.
    assert counted(EMBED_WAIT) > before


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    before = counted(LAG)
    watcher = asyncio.create_task(metrics.watch_loop_lag())
    await asyncio.sleep(0.01)
    time.sleep(metrics.LOOP_LAG_INTERVAL + 0.3)  # nothing runs for this long
    await asyncio.sleep(metrics.LOOP_LAG_INTERVAL)
    watcher.cancel()
    assert counted(LAG) - before >= 0.25
