"""The erase fence: set first by an erase, checked by every authenticated request.

Redis `erased:{<digest>}` (session plane, ERASED_SECONDS) answers the request
path in one EXISTS; PostgreSQL `erased_users` is the durable fence the writes
check (`persist_turn`, `create_session_row`, MemoryStore.write), set under the
user's advisory lock so a write in progress either lands before it (and the erase
removes it) or sees it.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis
from psycopg import AsyncConnection

from app.identity import user_digest
from app.ops import tracing
from app.privacy import ERASED_SECONDS
from app.sessions.history_db import user_erased_error
from app.stores import keys


async def check_not_erased(redis: aredis.Redis, user: str) -> None:
    """410 `user_erased` while the user's erase fence stands."""
    with tracing.untraced():  # admission, on every request: no span (app.ops.tracing)
        erased = await redis.exists(keys.erased_user(user_digest(user)))
    if erased:
        raise user_erased_error()


async def raise_fence(redis: aredis.Redis, conn: AsyncConnection[Any], user: str) -> None:
    """Fence the user in both stores (idempotent; a repeat restarts an unfinished erase)."""
    digest = user_digest(user)
    await redis.set(keys.erased_user(digest), 1, ex=ERASED_SECONDS)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("memory:" + user,))
        await conn.execute(
            "INSERT INTO erased_users (user_digest, user_id) VALUES (%s, %s)"
            " ON CONFLICT (user_digest) DO UPDATE SET user_id = EXCLUDED.user_id,"
            " finished_at = NULL",
            (digest, user),
        )
