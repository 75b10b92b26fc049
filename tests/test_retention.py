"""The privacy sweep: old history goes (HISTORY_RETENTION_DAYS), tombstones and
erase fences are trimmed after their bound, and an erase left unfinished is finished."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import redis

from app.errors import Gone
from app.identity import user_digest
from app.privacy import retention
from app.privacy.erase import Eraser
from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client

pytestmark = pytest.mark.anyio


async def _session_with_turn(store: Sessions, user: str) -> str:
    sid = await store.create(user)
    msg = messages.build(sid, 0, "user", "hello")
    await store.append(sid, user, [msg], 0)
    await store.persist(sid, user, [msg])
    return sid


async def test_sessions_untouched_past_the_retention_go_and_fresh_ones_stay(
    session_store: Sessions, pg: psycopg.Connection[Any], sr: redis.Redis, user: str,
) -> None:
    old = [await _session_with_turn(session_store, user) for _ in range(3)]
    fresh = await _session_with_turn(session_store, user)
    pg.execute("UPDATE sessions SET updated_at = now() - interval '40 days' WHERE id = ANY(%s)",
               (old,))
    assert await retention.expire_history(session_store, 0) == 0  # off: nothing goes
    assert await retention.expire_history(session_store, 30, batch=2) == 3
    left = {r[0] for r in pg.execute("SELECT id FROM sessions WHERE user_id = %s", (user,))}
    assert left == {fresh}
    for sid in old:
        assert not sr.exists(keys.session(sid)) and sr.exists(keys.session_deleted(sid))
        assert pg.execute("SELECT 1 FROM deleted_sessions WHERE id = %s", (sid,)).fetchone()
        assert pg.execute("SELECT count(*) FROM messages WHERE session_id = %s",
                          (sid,)).fetchone() == (0,)


async def test_an_old_session_with_an_unpersisted_write_is_in_use_and_stays(
    session_store: Sessions, pg: psycopg.Connection[Any], user: str,
) -> None:
    sid = await _session_with_turn(session_store, user)
    await session_store.append(sid, user, [messages.build(sid, 1, "user", "again")], 1)
    pg.execute("UPDATE sessions SET updated_at = now() - interval '40 days' WHERE id = %s", (sid,))
    assert await retention.expire_history(session_store, 30) == 0
    assert pg.execute("SELECT 1 FROM sessions WHERE id = %s", (sid,)).fetchone()


async def test_tombstones_are_trimmed_only_past_their_bound(
    session_store: Sessions, pg: psycopg.Connection[Any], user: str,
) -> None:
    keep = retention.tombstone_keep_seconds(86400)
    assert keep == 7 * 86400  # a week: far past a session's TTL and any turn in flight
    assert retention.tombstone_keep_seconds(30 * 86400) == 60 * 86400
    young = await _session_with_turn(session_store, user)
    old = await _session_with_turn(session_store, user)
    for sid in (young, old):
        await session_store.delete(sid, user)
    pg.execute("UPDATE deleted_sessions SET deleted_at = now() - interval '8 days'"
               " WHERE id = %s", (old,))
    async with session_store.pg.connection() as conn:
        assert await retention.trim_tombstones(conn, keep) >= 1
    assert not pg.execute("SELECT 1 FROM deleted_sessions WHERE id = %s", (old,)).fetchone()
    assert pg.execute("SELECT 1 FROM deleted_sessions WHERE id = %s", (young,)).fetchone()


async def test_the_sweep_finishes_an_erase_whose_process_died_and_trims_old_fences(
    session_store: Sessions, settings: Settings, pg: psycopg.Connection[Any], r: redis.Redis,
) -> None:
    user = f"gus-{uuid.uuid4().hex[:8]}"
    sid = await _session_with_turn(session_store, user)
    main = async_redis_client(settings.redis_url or "")
    try:
        eraser = Eraser(main, session_store, settings.redis_url or "")
        await eraser.erase(user, steps=())  # fenced, then the process died
        assert pg.execute("SELECT 1 FROM sessions WHERE id = %s", (sid,)).fetchone()
        pg.execute("UPDATE erased_users SET erased_at = now() - interval '1 hour'"
                   " WHERE user_digest = %s", (user_digest(user),))
        counts = await retention.sweep(eraser, 0, settings.session_ttl_seconds)
    finally:
        await main.aclose()
    assert counts["erasures_resumed"] >= 1
    assert not pg.execute("SELECT 1 FROM sessions WHERE id = %s", (sid,)).fetchone()
    row = pg.execute("SELECT user_id, finished_at IS NOT NULL FROM erased_users"
                     " WHERE user_digest = %s", (user_digest(user),)).fetchone()
    assert row == (None, True)
    with pytest.raises(Gone):
        await session_store.create(user)  # still fenced

    pg.execute("UPDATE erased_users SET finished_at = now() - interval '31 days'"
               " WHERE user_digest = %s", (user_digest(user),))
    async with session_store.pg.connection() as conn:
        assert await retention.trim_erased(conn) >= 1
    assert await session_store.create(user)  # 30 days on, the id may be used afresh
