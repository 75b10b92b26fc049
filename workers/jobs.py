"""rq jobs: importable functions that take ids, safe to run twice.

`sweep_unpersisted` persists sessions whose last writes never reached
PostgreSQL (the app died mid-stream, or PostgreSQL was down when a turn ended).
It runs every SWEEP_INTERVAL_SECONDS; a session is swept once it has been quiet
for SWEEP_GRACE_SECONDS, so a turn still streaming is left to its own persist.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, cast

from psycopg import AsyncConnection

from app import history_db, keys, scripts
from app.settings import Settings
from app.stores import async_redis_client

log = logging.getLogger("backbone.jobs")

SWEEP_GRACE_SECONDS = 5.0
SWEEP_BATCH = 200


def sweep_unpersisted(grace_seconds: float = SWEEP_GRACE_SECONDS) -> dict[str, int]:
    """Persist every quiet session in `sessions:unpersisted`; return counts."""
    return asyncio.run(_sweep(Settings.from_env(), grace_seconds))


async def _sweep(settings: Settings, grace_seconds: float) -> dict[str, int]:
    redis = async_redis_client(settings.redis_url or "")
    counts = {"sessions": 0, "messages": 0, "gone": 0, "failed": 0}
    try:
        cutoff = (time.time() - grace_seconds) * 1000
        due = cast(list[tuple[bytes, float]], await redis.zrangebyscore(
            keys.UNPERSISTED, "-inf", cutoff, start=0, num=SWEEP_BATCH, withscores=True
        ))
        if not due:
            return counts
        url = settings.database_url or ""
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            for raw_sid, score in due:
                sid = raw_sid.decode()
                try:
                    counts["messages"] += await _persist_one(redis, conn, sid, score)
                    counts["sessions"] += 1
                except Exception:
                    counts["failed"] += 1
                    log.exception("sweep could not persist session %s; left for the next run", sid)
    finally:
        await redis.aclose()
    log.info("sweep: %s", counts)
    return counts


async def _persist_one(redis: Any, conn: AsyncConnection[Any], sid: str, score: float) -> int:
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.session_user(sid))
    pipe.execute_command("JSON.GET", keys.session(sid), ".")
    owner, history = await pipe.execute(raise_on_error=False)
    inserted = 0
    if isinstance(owner, bytes) and isinstance(history, bytes):
        inserted = await history_db.persist(conn, sid, owner.decode(), json.loads(history))
    # Cleared only if no write came after the score we read; else the next sweep runs it.
    await scripts.arun(redis, scripts.clear_unpersisted(sid, score))
    return inserted
