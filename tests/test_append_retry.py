"""An append whose reply is lost is stored once: the append script answers "already
appended" (2) to a re-sent call whose batch the history already ends with.

The regression (issue #23, item 5): on a cluster without WAIT, redis-py's cluster
client re-sends EVALSHA by itself after a ConnectionError; the script answered
"conflict" (the first send had run), and `Sessions.append` renumbered the batch and
stored it a second time. The dropped reply is made real with a TCP proxy
(`tests/reply_dropper.py`) in front of the node that serves the session: Redis runs
the script and answers, the client never gets the answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.cluster import RedisCluster
from reply_dropper import ReplyDropper

from app.sessions.messages import build, canonical_json
from app.sessions.store import Sessions
from app.settings import Settings
from app.stack.cluster import EmbeddedCluster
from app.stores import keys, scripts

pytestmark = pytest.mark.anyio

APPEND_SHA = scripts.load_all()["append_messages"].sha.encode()


def contents(sr: redis.Redis | redis.RedisCluster, sid: str) -> list[str]:
    raw = sr.execute_command("JSON.GET", keys.session(sid), "$[*].content")
    return list(json.loads(raw))


def test_a_resent_append_is_already_appended_and_changes_nothing(
    r: redis.Redis, user: str
) -> None:
    sid = keys.new_session_id()
    scripts.run(r, scripts.create_session(sid, user, 600))
    batch = [canonical_json(build(sid, 0, "user", "once")),
             canonical_json(build(sid, 1, "assistant", "only once"))]
    assert scripts.run(r, scripts.append_messages(sid, user, 0, batch, 600)) == (1, 2)
    assert scripts.run(r, scripts.append_messages(sid, user, 0, batch, 900)) == (2, 2)
    assert contents(r, sid) == ["once", "only once"]
    # Renewed as the first call did, a write of its own (a WAIT after it covers both).
    assert r.ttl(keys.session(sid)) > 600 and r.ttl(keys.session_user(sid)) > 600
    # Not the same batch: a conflict, as before. Another text at the same seqs, the
    # same texts at the same seqs made at another moment (another hash), a prefix.
    other = [batch[0], canonical_json(build(sid, 1, "assistant", "only twice"))]
    later = [canonical_json(build(sid, 0, "user", "once", created_at="2030-01-01T00:00:00Z")),
             batch[1]]
    for moved in (other, later, batch[:1]):
        assert scripts.run(r, scripts.append_messages(sid, user, 0, moved, 600))[0] == -2
    # The same batch sent again after another append came: a conflict, not "appended".
    third = [canonical_json(build(sid, 2, "user", "third"))]
    assert scripts.run(r, scripts.append_messages(sid, user, 2, third, 600)) == (1, 3)
    assert scripts.run(r, scripts.append_messages(sid, user, 0, batch, 600)) == (-2, 3)
    assert contents(r, sid) == ["once", "only once", "third"]
    r.delete(*keys.session_keys(sid))


@pytest.fixture
async def through_dropper(
    stack_settings: Settings, session_cluster: EmbeddedCluster, user: str
) -> AsyncIterator[tuple[str, ReplyDropper, redis.RedisCluster, AsyncConnectionPool[Any]]]:
    """A session on the cluster, the proxy in front of the node serving its slot."""
    sr = redis.RedisCluster.from_url(session_cluster.url)
    sid = keys.new_session_id()
    scripts.run(sr, scripts.create_session(sid, user, 600))
    node = sr.get_node_from_key(keys.session(sid))
    dropper = await ReplyDropper(node.host, node.port).start()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        stack_settings.database_url or "", min_size=1, max_size=2, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    try:
        yield sid, dropper, sr, pool
    finally:
        await pool.close()
        await dropper.stop()
        sr.delete(*keys.session_keys(sid))
        sr.close()


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["no-wait", "wait"])
async def test_an_append_whose_reply_was_dropped_is_stored_exactly_once_on_a_cluster(
    through_dropper: tuple[str, ReplyDropper, redis.RedisCluster, AsyncConnectionPool[Any]],
    session_cluster: EmbeddedCluster, user: str, wait_replicas: int,
) -> None:
    sid, dropper, sr, pool = through_dropper
    node = sr.get_node_from_key(keys.session(sid))
    target = (node.host, node.port)

    def via_proxy(address: tuple[str, int]) -> tuple[str, int]:
        return ("127.0.0.1", dropper.port) if address == target else address

    client = RedisCluster.from_url(session_cluster.url, address_remap=via_proxy)
    store = Sessions(client, pool, 600, wait_replicas=wait_replicas, wait_timeout_ms=500)
    try:
        await store.append(sid, user, [build(sid, 0, "user", "warm-up")], 0)
        assert dropper.dropped == 0
        dropper.arm(APPEND_SHA)
        batch = [build(sid, 1, "user", "lost reply"), build(sid, 2, "assistant", "re: lost")]
        stored = await store.append(sid, user, batch, 1)
    finally:
        await client.aclose()
    assert dropper.dropped == 1  # Redis ran the script and its answer was lost
    assert stored == batch  # acknowledged at the seqs it was first stored at
    assert contents(sr, sid) == ["warm-up", "lost reply", "re: lost"]

