"""A user's data, exported and then erased: afterwards no Redis key and no
PostgreSQL row holds the user's id or words.

The user is made through the HTTP API: two chats carrying a unique marker word
(so kb_search results are cached, in the user's scope and in the shared global
scope, and a sampled cache hit queues an audit job), a private document asked
about, and memories mined by the real extraction job. After the erase every
Redis key (names and values, rq's compressed job data opened) and every row of
every PostgreSQL table is searched for the id and the marker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from conftest import BOTH_TOPOLOGIES
from rq import Queue, SimpleWorker
from starlette.testclient import TestClient
from test_fuzz import _turn
from waits import wait_until

from app.api import create_app
from app.auth import issue_token
from app.embeddings import shared_embedder
from app.errors import Gone
from app.kb.ingest import ingest_paths
from app.memory.facts import Fact
from app.memory.queue import dispatch_all
from app.memory.store import MemoryStore, Stored
from app.ops.keyspace import families
from app.privacy.coverage import KEY_FAMILIES, TABLES
from app.privacy.erase import own_eraser
from app.sessions import history_db, messages
from app.settings import Settings

pytestmark = BOTH_TOPOLOGIES


@dataclasses.dataclass
class Seeded:
    user: str
    marker: str
    headers: dict[str, str]
    sids: list[str]


@pytest.fixture(scope="module")
def erase_client(settings: Settings) -> Iterator[TestClient]:
    # A window longer than the seeding takes on a busy machine: its rate-limit keys must
    # still be there for the erase to clear.
    s = dataclasses.replace(settings, offline_token_delay_ms=0, retrieval_cache_audit_rate=1.0,
                            rate_limit_window_seconds=3600)
    with TestClient(create_app(s)) as c:
        yield c


def seed(client: TestClient, r: redis.Redis, sr: redis.Redis, pg: psycopg.Connection[Any],
         settings: Settings, folder: Path) -> Seeded:
    run = uuid.uuid4().hex[:10]
    user, marker = f"erin-{run}", f"quokka{run}"
    (folder / "vault.md").write_text(
        f"# The {marker} vault\n\nThe {marker} vault code is 8812-FERN. Erin keeps it here.\n")
    ingest_paths(r, shared_embedder(), [folder], scope=f"user:{user}", progress=False)
    h = {"Authorization": f"Bearer {issue_token(settings.auth_secret or '', user)}"}
    sids = []
    for _ in range(2):  # the second asks the same: a cache hit, and a queued audit
        sid = client.post("/v1/sessions", headers=h).json()["id"]
        _turn(client, sr, pg, sid, h, {"content": f"I am allergic to {marker} pollen. "
                                                 f"What is the {marker} vault code?"})
        sids.append(sid)
    wait_until(lambda: all(r.zscore("memory-due", s) is not None for s in sids),
               "both turns to mark their sessions due")
    dispatch_all(r)
    SimpleWorker([Queue("memory", connection=r)], connection=r).work(burst=True)
    return Seeded(user, marker, h, sids)


def _values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "hash":
        return [v for pair in client.hgetall(key).items() for v in pair]
    if kind == "zset":
        return list(client.zrange(key, 0, -1))
    if kind == "set":
        return list(client.smembers(key))
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    if kind == "stream":
        return [json.dumps([[k.decode(), {a.decode(): b.decode() for a, b in f.items()}]
                            for k, f in client.xrange(key)]).encode()]
    if kind == "ReJSON-RL":
        return [client.execute_command("JSON.GET", key, "$") or b""]  # type: ignore[no-untyped-call]
    return [client.dump(key) or b""]


def _opened(value: bytes) -> bytes:
    """rq keeps a job's data zlib-compressed: open it, or the marker would hide."""
    try:
        return value + zlib.decompress(value)
    except zlib.error:
        return value


def redis_traces(clients: list[redis.Redis], *needles: str) -> list[str]:
    found = []
    wanted = [n.lower().encode() for n in needles]
    for client in clients:
        for key in client.scan_iter(count=1000):
            texts = [key, *(_opened(v) for v in _values(client, key))]
            if any(w in t.lower() for t in texts for w in wanted):
                found.append(key.decode(errors="replace"))
    return sorted(set(found))


def pg_traces(pg: psycopg.Connection[Any], *needles: str) -> list[str]:
    tables = [row[0] for row in pg.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    found = []
    for table in tables:
        for (text,) in pg.execute(f'SELECT t::text FROM "{table}" t'):
            if any(n.lower() in text.lower() for n in needles):
                found.append(f"{table}: {text[:80]}")
    return found


def test_every_key_family_and_table_says_how_an_erase_treats_it(
    pg: psycopg.Connection[Any],
) -> None:
    assert set(families()) == set(KEY_FAMILIES)
    tables = {row[0] for row in pg.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == set(TABLES)


def test_export_holds_everything_and_erase_leaves_no_trace_in_either_store(
    erase_client: TestClient, r: redis.Redis, sr: redis.Redis, pg: psycopg.Connection[Any],
    stores_env: Settings, tmp_path: Path,
) -> None:
    settings = stores_env  # the memory job reads its stores from the environment
    who = seed(erase_client, r, sr, pg, settings, tmp_path)
    clients = [r, sr] if settings.session_redis_url else [r]
    before = redis_traces(clients, who.user, who.marker)
    rows = pg_traces(pg, who.user, who.marker)
    # The seeding reached every kind of place the erase must clear.
    for family in ("session:", "memory:", "kb:", "cache:kb_search", "cache-audit:", "ratelimit:"):
        assert any(k.startswith(family) for k in before), (family, before)
    for table in ("sessions", "messages", "memories"):
        assert any(row.startswith(table) for row in rows), (table, rows)

    with erase_client.stream("GET", "/v1/me/export", headers=who.headers) as res:
        assert res.status_code == 200
        exported = json.loads(b"".join(res.iter_bytes()))
    assert exported["user"] == who.user
    assert sorted(s["id"] for s in exported["sessions"]) == sorted(who.sids)
    assert all(who.marker in json.dumps(s["messages"]) for s in exported["sessions"])
    assert any(who.marker in m["content"] for m in exported["memories"])
    assert [d["title"] for d in exported["documents"]] == [f"The {who.marker} vault"]

    res = erase_client.delete("/v1/me", headers=who.headers)
    assert res.status_code == 200 and res.json()["status"] == "erased"
    assert res.json()["removed"]["sessions"] == 2

    assert redis_traces(clients, who.user, who.marker) == []
    assert pg_traces(pg, who.user, who.marker) == []
    for method, path in (("GET", "/v1/me/export"), ("POST", "/v1/sessions"),
                         ("GET", "/v1/sessions"), ("DELETE", "/v1/me")):
        gone = erase_client.request(method, path, headers=who.headers)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "user_erased"


def test_an_erase_cut_half_way_refuses_every_late_writer_and_finishes_when_run_again(
    erase_client: TestClient, r: redis.Redis, sr: redis.Redis, pg: psycopg.Connection[Any],
    stores_env: Settings, tmp_path: Path,
) -> None:
    settings = stores_env  # the memory job reads its stores from the environment
    who = seed(erase_client, r, sr, pg, settings, tmp_path)

    async def cut_then_write_then_resume() -> dict[str, int]:
        async with own_eraser(settings) as eraser:
            sessions = eraser.sessions
            # The process dies after the fence and the sessions: nothing else is gone.
            await eraser.erase(who.user, steps=("sessions",))
            # Writers that were already past the door arrive now.
            with pytest.raises(Gone):
                await sessions.create(who.user)
            async with sessions.pg.connection() as conn:
                late = messages.build(who.sids[0], 9, "user", f"late {who.marker}")
                with pytest.raises(Exception, match="deleted"):
                    await history_db.persist(conn, who.sids[0], who.user, [late])
            return await eraser.erase(who.user)  # run again: resumes, finishes

    late_memory = MemoryStore(r, pg, shared_embedder())
    removed = asyncio.run(cut_then_write_then_resume())
    assert removed["memories"] >= 1 and removed["documents"] == 1
    assert late_memory.write(who.user, None, [Fact("note", f"likes {who.marker}")]) == Stored()
    clients = [r, sr] if settings.session_redis_url else [r]
    assert redis_traces(clients, who.user, who.marker) == []
    assert pg_traces(pg, who.user, who.marker) == []
    res = erase_client.post(f"/v1/sessions/{who.sids[0]}/messages", headers=who.headers,
                            json={"content": f"hello {who.marker}"})
    assert res.status_code == 410
