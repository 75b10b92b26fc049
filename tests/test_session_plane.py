"""The session plane on both topologies: slot locality, sharded unpersisted marks,
the memory lock and cursor, and the extraction job with its keys on the session
plane and its memories on the search plane."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from redis.crc import key_slot

from app.embeddings import shared_embedder
from app.errors import SettingsError
from app.memory import RuleExtractor
from app.sessions import history_db, messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys, scripts
from tests.conftest import BOTH_TOPOLOGIES
from workers.jobs import _sweep
from workers.memory_job import run_extraction

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


def _slots(*names: str) -> set[int]:
    return {key_slot(n.encode()) for n in names}


def test_the_keys_of_each_session_and_user_operation_share_one_slot() -> None:
    sid, uid = keys.new_session_id(), "u-slots"
    operations = {
        "create": [keys.session(sid), keys.session_user(sid)],
        "append": [keys.session(sid), keys.session_user(sid), keys.session_deleted(sid)],
        "delete": [keys.session_deleted(sid), *keys.session_keys(sid)],
        "advance_cursor": [keys.memory_cursor(sid), keys.memory_lock(sid),
                           keys.memory_summary(sid), keys.memory_cursor_seq(sid)],
        "events": [keys.events(sid, 0), keys.events(sid, 7), keys.session(sid)],
        "rate limits": [keys.rate_limit(uid), keys.session_rate_limit(uid)],
    }
    assert {op: len(_slots(*names)) for op, names in operations.items()} == {
        op: 1 for op in operations}


def test_unpersisted_marks_spread_over_shards_on_every_primary_slot_range() -> None:
    sids = [keys.new_session_id() for _ in range(2000)]
    shards = Counter(keys.unpersisted(s) for s in sids)
    assert set(shards) == set(keys.unpersisted_shards())
    assert max(shards.values()) < 2 * len(sids) / keys.UNPERSISTED_SHARDS
    # the three primaries of the embedded cluster each serve a third of the slots
    thirds = Counter(key_slot(k.encode()) * 3 // 16384 for k in keys.unpersisted_shards())
    assert set(thirds) == {0, 1, 2}


@BOTH_TOPOLOGIES
async def test_the_sweep_clears_marks_in_every_shard(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    # One session per shard: the first hex digit picks the shard.
    sids = []
    for digit in "0123456789abcdef":
        sid = digit + keys.new_session_id()[1:]
        async with session_store.pg.connection() as conn:
            await history_db.insert_session(conn, sid, user)
        await scripts.arun(session_store.redis, scripts.create_session(sid, user, 3600))
        await session_store.append(sid, user, [messages.build(sid, 0, "user", "hi")], 0)
        sids.append(sid)
    assert len({keys.unpersisted(s) for s in sids}) == keys.UNPERSISTED_SHARDS
    counts = await _sweep(stores_env, 0.0)
    assert counts["failed"] == 0 and counts["sessions"] >= len(sids)
    assert [s for s in sids if sr.zscore(keys.unpersisted(s), s) is not None] == []


@BOTH_TOPOLOGIES
def test_lock_and_cursor_scripts_keep_their_rules_on_the_session_plane(sr: redis.Redis) -> None:
    sid = keys.new_session_id()
    assert scripts.run(sr, scripts.acquire_lock(sid, "a", 10_000)) == 1
    assert scripts.run(sr, scripts.acquire_lock(sid, "b", 10_000)) == 0
    assert scripts.run(sr, scripts.extend_lock(sid, "b", 10_000)) == 0
    assert scripts.run(sr, scripts.advance_cursor(
        sid, "b", None, "f" * 64, "s", 60, expected_seq=None, new_seq=1)) == 0
    assert scripts.run(sr, scripts.advance_cursor(
        sid, "a", None, "f" * 64, "s", 60, expected_seq=None, new_seq=1)) == 1
    assert scripts.run(sr, scripts.advance_cursor(
        sid, "a", "f" * 64, "e" * 64, "s", 60, expected_seq=1, new_seq=1)) == -2
    assert sr.get(keys.memory_cursor(sid)) == b"f" * 64
    assert scripts.run(sr, scripts.release_lock(sid, "b")) == 0
    assert scripts.run(sr, scripts.release_lock(sid, "a")) == 1
    sr.delete(*keys.session_keys(sid))


@BOTH_TOPOLOGIES
async def test_extraction_keeps_lock_cursor_and_summary_on_the_session_plane(
    session_store: Sessions, settings: Settings, user: str, r: redis.Redis, sr: redis.Redis,
    pg: psycopg.Connection[Any],
) -> None:
    sid = await session_store.create(user)
    batch = [messages.build(sid, 0, "user", "I live in Lisbon."),
             messages.build(sid, 1, "assistant", "Lisbon is lovely.")]
    await session_store.persist(sid, user, await session_store.append(sid, user, batch, 0))
    out = run_extraction(r, pg, sid, settings, RuleExtractor(),
                         shared_embedder(settings.embedding_model), sessions=sr)
    assert out["advanced"] is True and out["facts"] >= 1
    assert sr.get(keys.memory_cursor(sid)) == batch[-1]["hash"].encode()
    assert sr.get(keys.memory_summary(sid))
    assert not sr.exists(keys.memory_lock(sid))
    assert list(r.scan_iter(match=f"memory:{user}:*"))  # the recall copy: search plane


def test_a_cluster_flag_without_a_session_url_is_refused() -> None:
    with pytest.raises(SettingsError, match="SESSION_REDIS_URL"):
        Settings.from_env({"SESSION_REDIS_CLUSTER": "1"})
