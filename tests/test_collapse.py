"""Collapse: once a history outgrows the context budget, the mined messages leave Redis
(the rolling summary covers them), PostgreSQL keeps them, and nothing else notices."""

from __future__ import annotations

import pytest
import redis

from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys
from workers.memory_job import extract_memories

pytestmark = pytest.mark.anyio
FILLER = "The quick brown fox jumps over the lazy dog near the river bank. " * 15




async def _long_session(session_store: Sessions, user: str, n: int) -> str:
    sid = await session_store.create(user)
    batch = [messages.build(sid, i, "user" if i % 2 == 0 else "assistant",
                            f"I live in Lisbon. {FILLER}" if i == 0 else f"{i}: {FILLER}")
             for i in range(n)]
    stored = await session_store.append(sid, user, batch, 0)
    await session_store.persist(sid, user, stored)
    return sid


async def test_a_long_mined_history_is_collapsed_in_redis_and_kept_whole_everywhere_else(
    stores_env: Settings, session_store: Sessions, r: redis.Redis, user: str
) -> None:
    sid = await _long_session(session_store, user, 40)  # ~40 x 1,000 chars: far over the budget
    result = extract_memories(sid)
    assert result["advanced"] and result["collapsed"] > 0

    live = (await session_store.load(sid, user)).messages
    assert len(live) == 40 - result["collapsed"] and live[0]["seq"] == result["collapsed"]
    assert r.get(keys.memory_summary(sid)), "the summary stands in for what left Redis"

    # New messages continue the numbering; nothing reuses a seq.
    seq = messages.next_seq(live)
    assert seq == 40
    new = messages.build(sid, seq, "user", "And I work at Acme.")
    added = await session_store.append(sid, user, [new], seq)
    await session_store.persist(sid, user, added)
    full = (await session_store.full_history(sid, user)).messages
    assert [m["seq"] for m in full] == list(range(41))
    assert all(messages.is_intact(sid, m) for m in full)

    # Only the new message is mined next time, from the collapsed copy.
    again = extract_memories(sid)
    assert again["delta"] == 1


async def test_nothing_is_collapsed_while_the_session_has_unpersisted_writes(
    stores_env: Settings, session_store: Sessions, r: redis.Redis, user: str
) -> None:
    sid = await _long_session(session_store, user, 40)
    r.zadd(keys.unpersisted(sid), {sid: 1})  # as if a turn's persist had failed
    try:
        result = extract_memories(sid)
        assert result["advanced"] and result["collapsed"] == 0
        assert len((await session_store.load(sid, user)).messages) == 40
    finally:
        r.zrem(keys.unpersisted(sid), sid)
