"""cache_audits is trimmed by the worker's retention sweep, and the cache report reads
a bounded window of it (#23, item 2)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import AsyncConnectionPool
from rq import Queue

from app.cache.stats import AUDIT_WINDOW, cache_stats
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client
from workers.retention import sweep, trim_cache_audits
from workers.worker import enqueue_retention_if_due


@pytest.fixture
def tool(r: redis.Redis, pg: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    pg.execute("DELETE FROM cache_audits WHERE tool = %s", (name,))
    r.srem(keys.CACHE_TOOLS, name)
    r.delete(keys.cache_stats(name))


def _audits(pg: psycopg.Connection[Any], tool: str, n: int, days_ago: float,
            overlap: float) -> None:
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO cache_audits (entry_key, tool, overlap, invalidated, created_at) "
            "VALUES (%s, %s, %s, false, now() - make_interval(secs => %s))",
            [(f"cache:{tool}:{i:x}", tool, overlap, days_ago * 86400 + i) for i in range(n)],
        )


def _ages(pg: psycopg.Connection[Any], tool: str) -> list[int]:
    rows = pg.execute("SELECT floor(extract(epoch FROM now() - created_at) / 86400)::int "
                      "FROM cache_audits WHERE tool = %s ORDER BY 1", (tool,)).fetchall()
    return [int(r[0]) for r in rows]


def test_the_retention_sweep_deletes_audits_past_the_retention_and_keeps_the_rest(
    stores_env: Settings, pg: psycopg.Connection[Any], tool: str
) -> None:
    _audits(pg, tool, 5, days_ago=40, overlap=0.5)
    _audits(pg, tool, 3, days_ago=1, overlap=0.5)
    counts = trim_cache_audits(30, batch=2)  # in batches of 2: 5 old rows take 3
    assert counts["deleted"] >= 5 and counts["batches"] >= 3
    assert _ages(pg, tool) == [1, 1, 1]


def test_the_retention_defaults_to_cache_audit_retention_days(
    stores_env: Settings, pg: psycopg.Connection[Any], tool: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CACHE_AUDIT_RETENTION_DAYS", "7")
    _audits(pg, tool, 2, days_ago=8, overlap=0.5)
    _audits(pg, tool, 2, days_ago=6, overlap=0.5)
    trim_cache_audits()
    assert _ages(pg, tool) == [6, 6]


def test_the_hourly_sweep_trims_audits_and_runs_the_privacy_sweep(
    stores_env: Settings, pg: psycopg.Connection[Any], tool: str
) -> None:
    _audits(pg, tool, 2, days_ago=45, overlap=0.5)
    counts = sweep()
    assert counts["cache_audits_deleted"] >= 2 and _ages(pg, tool) == []
    # The privacy part ran too: its counts are there (history, tombstones, erasures).
    assert {"erasures_resumed", "sessions_expired", "tombstones_trimmed"} <= set(counts)


def test_one_retention_sweep_is_enqueued_per_interval_over_all_workers(
    settings: Settings, r: redis.Redis
) -> None:
    r.delete(keys.RETENTION_TICK)
    persist = Queue("persist", connection=r)
    before = set(persist.job_ids)
    try:
        assert enqueue_retention_if_due(settings, r) is True
        assert enqueue_retention_if_due(settings, r) is False  # another worker, same hour
        new = [persist.fetch_job(j) for j in set(persist.job_ids) - before]
        assert [j.func_name for j in new if j] == ["workers.retention.sweep"]
        assert 0 < r.ttl(keys.RETENTION_TICK) <= 3600
    finally:
        for job_id in set(persist.job_ids) - before:
            persist.remove(job_id)
        r.delete(keys.RETENTION_TICK)


def test_the_report_reads_only_each_tools_latest_audits(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], tool: str
) -> None:
    _audits(pg, tool, 50, days_ago=2, overlap=0.0)  # older, beyond the window
    _audits(pg, tool, AUDIT_WINDOW, days_ago=1, overlap=1.0)
    r.hset(keys.cache_stats(tool), "lookups", 1)
    r.sadd(keys.CACHE_TOOLS, tool)

    async def report() -> dict[str, Any]:
        client = async_redis_client(settings.redis_url or "")
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url or "", min_size=1, max_size=2, open=False,
            kwargs={"autocommit": True})
        await pool.open()
        try:
            return (await cache_stats(client, pool, {}))[tool]
        finally:
            await pool.close()
            await client.aclose()

    row = asyncio.run(report())
    assert row["mean_overlap"] == 1.0 and row["p10_overlap"] == 1.0
