"""A primary of the session-plane cluster dies under a steady writer.

20 sessions take turns back to back (a user and an assistant message per turn,
through `Sessions.append`, the app's own path); one primary gets SIGKILL, its
replica takes over, the writer goes on. Then every session's history is read
back and compared with what was acknowledged: lost = acknowledged but absent,
duplicated = present more than once. The cluster is this module's own, so the
kill touches no other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stack.cluster import EmbeddedCluster
from app.stores import keys
from app.stores.clients import async_session_redis_client

pytestmark = pytest.mark.anyio

SESSIONS = 20
BEFORE_KILL_SECONDS = 2.0
AFTER_KILL_SECONDS = 10.0


@pytest.fixture(scope="module")
def own_cluster(stack_settings: Settings) -> Iterator[EmbeddedCluster]:
    from tests.conftest import scratch

    with scratch("failover") as data_dir:
        cluster = EmbeddedCluster(Path(data_dir))
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


async def _writer(
    store: Sessions, sid: str, user: str, stop: asyncio.Event,
    acked: list[str], errors: list[tuple[float, str]], gaps: list[float],
) -> None:
    seq, n = 0, 0
    last = time.monotonic()
    while not stop.is_set():
        text = f"{sid[:6]}-turn-{n}"
        batch = [messages.build(sid, seq, "user", text),
                 messages.build(sid, seq + 1, "assistant", f"re: {text}")]
        try:
            stored = await store.append(sid, user, batch, seq)
        except Exception as exc:  # the switch: count it, reload, go on
            errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:120]))
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                seq = messages.next_seq((await store.load(sid, user)).messages)
            continue
        acked.extend(m["content"] for m in stored)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
        seq = int(stored[-1]["seq"]) + 1
        n += 1


async def test_a_primary_killed_under_load_loses_and_duplicates_no_acknowledged_message(
    own_cluster: EmbeddedCluster, stack_settings: Settings, user: str
) -> None:
    import dataclasses

    settings = dataclasses.replace(stack_settings, session_redis_url=own_cluster.url,
                                   session_redis_cluster=True)
    redis = async_session_redis_client(settings)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=4, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    store = Sessions(redis, pool, 3600)
    try:
        sids = [await store.create(user) for _ in range(SESSIONS)]
        acked: dict[str, list[str]] = {sid: [] for sid in sids}
        errors: list[tuple[float, str]] = []
        gaps: list[float] = []
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_writer(store, sid, user, stop, acked[sid], errors, gaps))
                 for sid in sids]
        await asyncio.sleep(BEFORE_KILL_SECONDS)
        victim = own_cluster.primaries()[0]
        before = sum(len(a) for a in acked.values())
        killed_at = time.monotonic()
        victim.kill()
        await asyncio.sleep(AFTER_KILL_SECONDS)
        stop.set()
        await asyncio.gather(*tasks)
        after = sum(len(a) for a in acked.values()) - before

        lost = duplicated = 0
        for sid in sids:
            held = Counter(m["content"] for m in (await store.load(sid, user)).messages)
            lost += sum(1 for text in acked[sid] if held[text] == 0)
            duplicated += sum(c - 1 for c in held.values() if c > 1)
        error_window = (max(t for t, _ in errors) - killed_at) if errors else 0.0
        print(f"\nfailover: acked {before} before the kill, {after} after; lost {lost}, "
              f"duplicated {duplicated}; {len(errors)} errors "
              f"({dict(Counter(e for _, e in errors))}) over {error_window:.1f} s "
              f"after the kill; longest wait for an ack {max(gaps):.1f} s")
        assert after > 0, "the writer did not go on after the failover"
        assert duplicated == 0
        assert lost == 0
        assert len(own_cluster.primaries()) == 3  # the replica took over
        assert all(keys.check_session_id(s) for s in sids)
    finally:
        await pool.close()
        await redis.aclose()
