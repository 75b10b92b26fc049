"""rq jobs: importable functions that take ids, safe to run twice.

`sweep_unpersisted` persists sessions whose last writes never reached
PostgreSQL (the app died mid-stream, or PostgreSQL was down when a turn ended).
It runs every SWEEP_INTERVAL_SECONDS; a session is swept once it has been quiet
for SWEEP_GRACE_SECONDS, so a turn still streaming is left to its own persist.

The marks are sharded (`sessions:unpersisted:{<n>}`, app/stores/keys.py); a
run walks every shard. One run drains the backlog: batches of SWEEP_BATCH
sessions (their Redis copies read in one round trip, each session persisted
in its own transaction) until nothing quiet is left, or SWEEP_BUDGET_SECONDS
have passed (the next run goes on), or a whole batch failed (PostgreSQL is
down: retrying now only spins).

Every mark it clears is counted: `sessions` persisted, `deleted` (the session
was deleted: the tombstone refuses it, nothing written), `gone` (the Redis copy
expired after its last write was persisted: PostgreSQL's `updated_at` is later
than the mark), `lost` (the Redis copy vanished before it was persisted: TTL
lapsed during a PostgreSQL outage, or eviction; logged as a warning, since
acknowledged messages are gone).
`failed` leaves the mark for the next run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, cast

from psycopg import AsyncConnection

from app.errors import NotFound
from app.sessions import history_db
from app.settings import Settings
from app.stores import keys, scripts
from app.stores.clients import async_session_redis_client

log = logging.getLogger("backbone.jobs")

SWEEP_GRACE_SECONDS = 5.0
SWEEP_BATCH = 200
# One run stops starting batches after this long; the rq job timeout is 300 s.
SWEEP_BUDGET_SECONDS = 120.0


def sweep_unpersisted(grace_seconds: float = SWEEP_GRACE_SECONDS) -> dict[str, int]:
    """Persist every quiet session in the `sessions:unpersisted` shards; return counts."""
    return asyncio.run(_sweep(Settings.from_env(), grace_seconds))


def _counts() -> dict[str, int]:
    return {"sessions": 0, "messages": 0, "deleted": 0, "gone": 0, "lost": 0, "failed": 0,
            "batches": 0}


async def _sweep(
    settings: Settings,
    grace_seconds: float,
    budget_seconds: float = SWEEP_BUDGET_SECONDS,
    batch_size: int = SWEEP_BATCH,
) -> dict[str, int]:
    redis = async_session_redis_client(settings)
    counts = _counts()
    deadline = time.monotonic() + budget_seconds
    conn: AsyncConnection[Any] | None = None
    try:
        cutoff = (time.time() - grace_seconds) * 1000
        pg_down = False
        for shard in keys.unpersisted_shards():
            if pg_down:
                break
            failed_here = 0
            while time.monotonic() < deadline:
                # Failed sessions keep their mark and their (old) score: skip past them.
                due = cast(list[tuple[bytes, float]], await redis.zrangebyscore(
                    shard, "-inf", cutoff, start=failed_here, num=batch_size, withscores=True,
                ))
                if not due:
                    break
                if conn is None:
                    conn = await AsyncConnection.connect(settings.database_url or "",
                                                         autocommit=True)
                failed_before = counts["failed"]
                await _sweep_batch(redis, conn, due, counts)
                counts["batches"] += 1
                failed_here += counts["failed"] - failed_before
                # A whole batch failed: PostgreSQL is down, the other shards would too.
                pg_down = counts["failed"] - failed_before == len(due)
                if pg_down or len(due) < batch_size:
                    break
    finally:
        if conn is not None:
            await conn.close()
        await redis.aclose()
    if any(counts[k] for k in ("sessions", "deleted", "gone", "lost", "failed")):
        log.info("sweep: %s", counts)
    return counts


async def _sweep_batch(
    redis: Any, conn: AsyncConnection[Any], due: list[tuple[bytes, float]],
    counts: dict[str, int],
) -> None:
    sids = [raw.decode() for raw, _ in due]
    pipe = redis.pipeline(transaction=False)
    for sid in sids:
        pipe.get(keys.session_user(sid))
        pipe.execute_command("JSON.GET", keys.session(sid), ".")
        pipe.exists(keys.session_deleted(sid))
    replies = await pipe.execute(raise_on_error=False)
    for i, (sid, (_, score)) in enumerate(zip(sids, due, strict=True)):
        owner, history, fenced = replies[3 * i: 3 * i + 3]
        try:
            outcome, inserted = await _persist_one(conn, sid, score, owner, history, fenced)
        except Exception:
            counts["failed"] += 1
            log.exception("sweep could not persist session %s; left for the next run", sid)
            continue
        counts["messages"] += inserted
        counts[outcome] += 1
        # Cleared only if no write came after the score we read; else the next run has it.
        await scripts.arun(redis, scripts.clear_unpersisted(sid, score))


async def _persist_one(
    conn: AsyncConnection[Any], sid: str, score: float, owner: Any, history: Any, fenced: Any
) -> tuple[str, int]:
    """(what became of the session, messages inserted)."""
    if fenced == 1:
        return "deleted", 0
    if not (isinstance(owner, bytes) and isinstance(history, bytes)):
        if await history_db.is_deleted(conn, sid):
            return "deleted", 0
        if await history_db.persisted_since(conn, sid, score / 1000):
            # Its last write was persisted; only the mark outlived the copy (the
            # clear failed): nothing lost.
            return "gone", 0
        log.warning(
            "sweep: session %s left Redis before it was persisted (TTL or eviction; check "
            "maxmemory-policy is noeviction): its unpersisted messages are lost", sid,
        )
        return "lost", 0
    try:
        done = await history_db.persist(conn, sid, owner.decode(), json.loads(history))
        return "sessions", done.inserted
    except NotFound:  # tombstoned between our read and the persist
        return "deleted", 0
