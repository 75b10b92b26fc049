"""What the privacy sweep removes over time (workers/privacy.py runs it hourly).

- History: with HISTORY_RETENTION_DAYS set, a session whose last persist is older
  than that is deleted as `DELETE /v1/sessions/{sid}` would (fence, Redis keys,
  tombstone, rows), BATCH at a time within the run's budget. A session with an
  unpersisted write is being used: it is left alone.
- Tombstones (`deleted_sessions`): kept TOMBSTONE_DAYS, or twice SESSION_TTL_SECONDS
  if that is longer. A late persist can only come from a turn still streaming
  (minutes) or from a live Redis copy, and a delete removes the copy and keeps the
  Redis fence for SESSION_TTL_SECONDS; past both, nothing can resurrect the session.
- Erased users: an erase left unfinished for RESUME_AFTER_SECONDS (its process
  died) is run again; a finished one's row goes after ERASED_DAYS, when the
  Redis fence expires too.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from psycopg import AsyncConnection

from app.privacy import ERASED_DAYS
from app.privacy.erase import Eraser
from app.sessions.store import Sessions
from app.stores import keys

BATCH = 100
TOMBSTONE_DAYS = 7
RESUME_AFTER_SECONDS = 600


def tombstone_keep_seconds(session_ttl_seconds: int) -> int:
    return max(TOMBSTONE_DAYS * 86400, 2 * session_ttl_seconds)


async def expire_history(sessions: Sessions, days: int, *, budget_seconds: float = 120.0,
                         batch: int = BATCH) -> int:
    """Delete sessions untouched for `days` (0: none); how many."""
    if days <= 0:
        return 0
    deadline = time.monotonic() + budget_seconds
    removed, skip = 0, 0
    while time.monotonic() < deadline:
        async with sessions.pg.connection() as conn:
            cur = await conn.execute(
                "SELECT id, user_id FROM sessions WHERE updated_at < now() - make_interval("
                "days => %s) ORDER BY updated_at LIMIT %s OFFSET %s", (days, batch, skip))
            rows = await cur.fetchall()
        for sid, user in rows:
            if await sessions.redis.zscore(keys.unpersisted(sid), sid) is not None:
                skip += 1  # written since its last persist: in use
                continue
            await sessions.delete(sid, user)
            removed += 1
        if len(rows) < batch:
            break
    return removed


async def trim_tombstones(conn: AsyncConnection[Any], keep_seconds: int) -> int:
    total = 0
    while True:
        cur = await conn.execute(
            "DELETE FROM deleted_sessions WHERE id IN (SELECT id FROM deleted_sessions"
            " WHERE deleted_at < now() - make_interval(secs => %s) LIMIT %s)",
            (keep_seconds, BATCH * 10))
        total += cur.rowcount
        if cur.rowcount < BATCH * 10:
            return total


async def trim_erased(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute(
        "DELETE FROM erased_users WHERE finished_at < now() - make_interval(days => %s)",
        (ERASED_DAYS,))
    return cur.rowcount


async def resume_erasures(eraser: Eraser, *, after_seconds: float = RESUME_AFTER_SECONDS) -> int:
    async with eraser.sessions.pg.connection() as conn:
        cur = await conn.execute(
            "SELECT user_id FROM erased_users WHERE finished_at IS NULL AND user_id IS NOT NULL"
            " AND erased_at < now() - make_interval(secs => %s)", (after_seconds,))
        users = [str(row[0]) for row in await cur.fetchall()]
    for user in users:
        await eraser.erase(user)
    return len(users)


async def sweep(eraser: Eraser, retention_days: int, session_ttl_seconds: int) -> dict[str, int]:
    """One privacy sweep: resumed erasures, expired history, trimmed tombstones and fences."""
    counts: Counter[str] = Counter()
    counts["erasures_resumed"] = await resume_erasures(eraser)
    counts["sessions_expired"] = await expire_history(eraser.sessions, retention_days)
    async with eraser.sessions.pg.connection() as conn:
        counts["tombstones_trimmed"] = await trim_tombstones(
            conn, tombstone_keep_seconds(session_ttl_seconds))
        counts["erased_users_trimmed"] = await trim_erased(conn)
    return dict(counts)
