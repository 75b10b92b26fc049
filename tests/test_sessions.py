"""Sessions against real Redis Stack and PostgreSQL: atomic appends, restore, persist, sweep."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, SimpleWorker

from app.errors import Conflict, Forbidden, NotFound
from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = [
    pytest.mark.anyio,
    BOTH_TOPOLOGIES,
]




def _msg(sid: str, seq: int, text: str, role: str = "user") -> messages.Message:
    return messages.build(sid, seq, role, text)


async def _turn(session_store: Sessions, sid: str, user: str, n: int, start: int = 0) -> list[Any]:
    batch = [_msg(sid, start + i, f"message {start + i}") for i in range(n)]
    return await session_store.append(sid, user, batch, start)


async def test_concurrent_appends_from_many_tasks_lose_and_duplicate_nothing(
    session_store: Sessions, user: str
) -> None:
    sid = await session_store.create(user)

    async def writer(i: int) -> None:
        # Every writer saw the empty history; all but one lose the race and retry.
        await session_store.append(sid, user, [_msg(sid, 0, f"from task {i}")], 0)

    await asyncio.gather(*(writer(i) for i in range(40)))
    history = (await session_store.load(sid, user)).messages
    assert [m["seq"] for m in history] == list(range(40))
    assert sorted(m["content"] for m in history) == sorted(f"from task {i}" for i in range(40))
    assert all(messages.is_intact(sid, m) for m in history)


async def test_a_stale_append_without_retry_is_a_conflict_and_changes_nothing(
    session_store: Sessions, user: str
) -> None:
    sid = await session_store.create(user)
    await _turn(session_store, sid, user, 2)
    with pytest.raises(Conflict) as info:
        await session_store.append(sid, user, [_msg(sid, 0, "stale")], 0, retry=False)
    assert info.value.status == 409
    assert [m["content"] for m in (await session_store.load(sid, user)).messages] == [
        "message 0", "message 1"
    ]


async def test_another_user_can_neither_append_nor_read(session_store: Sessions, user: str) -> None:
    sid = await session_store.create(user)
    with pytest.raises(Forbidden):
        await session_store.append(sid, "mallory", [_msg(sid, 0, "intrusion")], 0)
    with pytest.raises(Forbidden):
        await session_store.load(sid, "mallory")
    assert (await session_store.load(sid, user)).messages == []


async def test_reads_and_writes_renew_the_ttl_of_history_and_owner(
    session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    sid = await session_store.create(user)
    sr.expire(keys.session(sid), 100)
    sr.expire(keys.session_user(sid), 100)
    await _turn(session_store, sid, user, 1)
    assert sr.ttl(keys.session(sid)) > 1000 and sr.ttl(keys.session_user(sid)) > 1000
    sr.expire(keys.session(sid), 100)
    sr.expire(keys.session_user(sid), 100)
    await session_store.load(sid, user)
    assert sr.ttl(keys.session(sid)) > 1000 and sr.ttl(keys.session_user(sid)) > 1000


async def test_expiry_then_access_restores_an_identical_history(
    session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    sid = await session_store.create(user)
    stored = await _turn(session_store, sid, user, 5)
    await session_store.persist(sid, user, stored)
    before = (await session_store.load(sid, user)).messages
    sr.pexpire(keys.session(sid), 1)
    sr.pexpire(keys.session_user(sid), 1)
    await asyncio.sleep(0.05)
    assert not sr.exists(keys.session(sid))

    after = await session_store.load(sid, user)
    assert after.restored
    assert after.messages == before
    assert all(messages.is_intact(sid, m) for m in after.messages)
    assert sr.ttl(keys.session(sid)) > 1000
    # And the restored copy takes further appends.
    await _turn(session_store, sid, user, 1, start=5)
    assert len((await session_store.load(sid, user)).messages) == 6


async def test_racing_restores_write_once(
    session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    sid = await session_store.create(user)
    await session_store.persist(sid, user, await _turn(session_store, sid, user, 3))
    sr.delete(keys.session(sid), keys.session_user(sid))
    loads = await asyncio.gather(*(session_store.load(sid, user) for _ in range(12)))
    assert sum(1 for x in loads if x.restored) == 1
    assert all(x.messages == loads[0].messages for x in loads)
    assert len(loads[0].messages) == 3


async def test_a_restore_for_another_user_is_refused_and_writes_nothing(
    session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    sid = await session_store.create(user)
    await session_store.persist(sid, user, await _turn(session_store, sid, user, 1))
    sr.delete(keys.session(sid), keys.session_user(sid))
    with pytest.raises(Forbidden):
        await session_store.load(sid, "mallory")
    assert not sr.exists(keys.session(sid))


async def test_an_unknown_session_is_not_found(session_store: Sessions, user: str) -> None:
    with pytest.raises(NotFound):
        await session_store.load(keys.new_session_id(), user)


async def test_persisting_twice_changes_nothing(
    session_store: Sessions, user: str, settings: Settings
) -> None:
    sid = await session_store.create(user)
    turn = await _turn(session_store, sid, user, 3)
    assert await session_store.persist(sid, user, turn) == 3

    def snapshot() -> list[tuple[Any, ...]]:
        with psycopg.connect(settings.database_url or "") as conn:
            return conn.execute(
                "SELECT seq, xmin::text, body::text FROM messages WHERE session_id = %s "
                "ORDER BY seq", (sid,),
            ).fetchall()

    first = snapshot()
    assert await session_store.persist(sid, user, turn) == 0
    assert snapshot() == first  # same rows, same row versions: nothing rewritten


def _sweep(r: redis.Redis, grace: float = 0.0) -> dict[str, int]:
    q = Queue("persist", connection=r)
    job = q.enqueue("workers.jobs.sweep_unpersisted", grace)
    SimpleWorker([q], connection=r).work(burst=True)
    job.refresh()  # type: ignore[no-untyped-call]
    assert job.is_finished, job.latest_result()
    result = job.return_value()
    assert isinstance(result, dict)
    return result


KILLED_APP = textwrap.dedent("""
    import asyncio, os, signal, sys
    from psycopg_pool import AsyncConnectionPool
    from app.sessions import messages
    from app.sessions.store import Sessions
    from app.settings import Settings
    from app.stores.clients import async_session_redis_client

    async def main() -> None:
        redis_url, db_url, user = sys.argv[1:4]
        pool = AsyncConnectionPool(db_url, open=False, kwargs={"autocommit": True})
        await pool.open()
        # SESSION_REDIS_URL / SESSION_REDIS_CLUSTER come from the environment.
        settings = Settings.from_env().with_urls(redis_url, db_url)
        session_store = Sessions(async_session_redis_client(settings), pool, 86400)
        sid = await session_store.create(user)
        batch = [messages.build(sid, i, "user", f"acknowledged {i}") for i in range(4)]
        await session_store.append(sid, user, batch, 0)
        print(sid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the turn is persisted

    asyncio.run(main())
""")


def test_an_app_killed_between_append_and_persist_loses_nothing_once_the_sweep_runs(
    stores_env: Settings, r: redis.Redis, sr: redis.Redis, user: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_APP, stores_env.redis_url or "",
         stores_env.database_url or "", user],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )
    assert proc.returncode == -9, proc.stderr
    sid = proc.stdout.strip()
    assert sr.zscore(keys.unpersisted(sid), sid) is not None

    counts = _sweep(r)
    assert counts["failed"] == 0
    with psycopg.connect(stores_env.database_url or "") as conn:
        rows = conn.execute(
            "SELECT seq, content FROM messages WHERE session_id = %s ORDER BY seq", (sid,)
        ).fetchall()
    assert rows == [(i, f"acknowledged {i}") for i in range(4)]
    assert sr.zscore(keys.unpersisted(sid), sid) is None
    assert _sweep(r)["messages"] == 0  # a second sweep finds nothing new


async def test_the_sweep_keeps_a_session_written_again_after_it_read_it(
    session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    from app.stores import scripts

    sid = await session_store.create(user)
    await _turn(session_store, sid, user, 1)
    seen = sr.zscore(keys.unpersisted(sid), sid)
    assert seen is not None
    await _turn(session_store, sid, user, 1, start=1)  # a newer write moves the score
    assert scripts.run(sr, scripts.clear_unpersisted(sid, seen)) == 0
    assert sr.zscore(keys.unpersisted(sid), sid) is not None


async def test_the_sweep_leaves_a_session_still_being_written(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    sid = await session_store.create(user)
    await _turn(session_store, sid, user, 1)
    from workers.jobs import _sweep as sweep_now

    await sweep_now(stores_env, 60.0)  # the session has not been quiet for 60 s yet
    assert sr.zscore(keys.unpersisted(sid), sid) is not None


async def test_delete_removes_both_stores_and_the_memory_keys(
    session_store: Sessions, user: str, sr: redis.Redis, settings: Settings
) -> None:
    sid = await session_store.create(user)
    await session_store.persist(sid, user, await _turn(session_store, sid, user, 2))
    for k in (keys.memory_cursor(sid), keys.memory_summary(sid), keys.memory_lock(sid)):
        sr.set(k, "x")
    with pytest.raises(Forbidden):
        await session_store.delete(sid, "mallory")
    await session_store.delete(sid, user)
    assert not any(sr.exists(k) for k in keys.session_keys(sid))
    assert sr.zscore(keys.unpersisted(sid), sid) is None
    with psycopg.connect(settings.database_url or "") as conn:
        assert conn.execute("SELECT count(*) FROM messages WHERE session_id = %s",
                            (sid,)).fetchone() == (0,)
    with pytest.raises(NotFound):
        await session_store.load(sid, user)


async def test_the_sweep_counts_and_logs_a_session_that_left_redis_before_it_was_persisted(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from workers.jobs import _sweep as sweep_now

    sid = await session_store.create(user)
    await _turn(session_store, sid, user, 2)  # acknowledged, never persisted
    sr.delete(keys.session(sid), keys.session_user(sid))  # TTL lapsed, or evicted
    with caplog.at_level("WARNING", logger="backbone.jobs"):
        counts = await sweep_now(stores_env, 0.0)
    assert counts["lost"] >= 1
    assert any(sid in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)
    assert sr.zscore(keys.unpersisted(sid), sid) is None


async def test_the_sweep_does_not_call_lost_a_session_persisted_before_its_copy_expired(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    from workers.jobs import _sweep as sweep_now

    sid = await session_store.create(user)
    await session_store.persist(sid, user, await _turn(session_store, sid, user, 2))
    sr.zadd(keys.unpersisted(sid), {sid: 1000.0})  # a mark whose clear failed, long ago
    sr.delete(keys.session(sid), keys.session_user(sid))
    counts = await sweep_now(stores_env, 0.0)
    assert counts["gone"] >= 1 and sr.zscore(keys.unpersisted(sid), sid) is None


async def test_one_sweep_drains_a_backlog_larger_than_its_batch(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis,
    settings: Settings,
) -> None:
    from workers.jobs import _sweep as sweep_now

    sids = [await session_store.create(user) for _ in range(23)]
    for sid in sids:
        await _turn(session_store, sid, user, 2)
    counts = await sweep_now(stores_env, 0.0, batch_size=5)
    assert counts["batches"] >= 5 and counts["failed"] == 0
    assert [sid for sid in sids if sr.zscore(keys.unpersisted(sid), sid) is not None] == []
    with psycopg.connect(settings.database_url or "") as conn:
        row = conn.execute("SELECT count(*) FROM messages WHERE session_id = ANY(%s)",
                           (sids,)).fetchone()
    assert row == (2 * len(sids),)


async def test_a_sweep_out_of_time_leaves_the_rest_for_the_next_run(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis
) -> None:
    from workers.jobs import _sweep as sweep_now

    sid = await session_store.create(user)
    await _turn(session_store, sid, user, 1)
    assert (await sweep_now(stores_env, 0.0, budget_seconds=0.0))["batches"] == 0
    assert sr.zscore(keys.unpersisted(sid), sid) is not None
    await sweep_now(stores_env, 0.0)
    assert sr.zscore(keys.unpersisted(sid), sid) is None
