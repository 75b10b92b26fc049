"""The privacy sweep: retention, tombstones, unfinished erasures (app.privacy.retention).

Part of the hourly retention sweep (workers.retention.sweep). Safe to run twice:
every part finds only what is left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from psycopg_pool import AsyncConnectionPool

from app.privacy import retention
from app.privacy.erase import Eraser
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores.clients import async_redis_client, async_session_redis_client

log = logging.getLogger("backbone.privacy")


def privacy_sweep() -> dict[str, int]:
    """One sweep with the worker's settings; returns what it removed."""
    return asyncio.run(run_sweep(Settings.from_env()))


async def run_sweep(settings: Settings) -> dict[str, int]:
    redis = async_redis_client(settings.redis_url or "")
    session_redis = async_session_redis_client(settings, main=redis)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=2, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    try:
        sessions = Sessions(session_redis, pool, settings.session_ttl_seconds)
        eraser = Eraser(redis, sessions, settings.redis_url or "")
        counts = await retention.sweep(eraser, settings.history_retention_days,
                                       settings.session_ttl_seconds)
    finally:
        await pool.close()
        if session_redis is not redis:
            await session_redis.aclose()
        await redis.aclose()
    if any(counts.values()):
        log.info("privacy sweep: %s", counts)
    return counts
