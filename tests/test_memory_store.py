"""Long-term memory storage, recall and the /v1/memories routes."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import AsyncConnectionPool
from starlette.testclient import TestClient

from app.api import create_app
from app.embeddings import Embedder, shared_embedder
from app.memory import Fact
from app.memory.recall import make_recall, recall
from app.memory.store import MemoryStore, memory_id, nearest
from app.memory.usage import UsageMarks
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client

Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


@pytest.fixture
def embedder(settings: Settings) -> Embedder:
    return shared_embedder(settings.embedding_model)


@pytest.fixture
def store(r: redis.Redis, pg: psycopg.Connection[Any], embedder: Embedder) -> MemoryStore:
    return MemoryStore(r, pg, embedder)


def rows(pg: psycopg.Connection[Any], user: str) -> list[tuple[str, str, str]]:
    found = pg.execute(
        "SELECT id, kind, content FROM memories WHERE user_id = %s ORDER BY content", (user,)
    ).fetchall()
    return [(str(i), str(k), str(c)) for i, k, c in found]


def test_memory_ids_ignore_case_and_spacing_but_not_user_or_kind() -> None:
    a = memory_id("ana", "allergy", "is allergic to  Peanuts")
    assert a == memory_id("ana", "allergy", " is allergic to peanuts ")
    assert a != memory_id("bob", "allergy", "is allergic to peanuts")
    assert a != memory_id("ana", "note", "is allergic to peanuts")
    assert len(a) == 32 and int(a, 16) >= 0


def test_writing_the_same_facts_twice_adds_nothing(
    store: MemoryStore, pg: psycopg.Connection[Any], r: redis.Redis, user: str
) -> None:
    facts = [Fact("allergy", "is allergic to peanuts"), Fact("location", "lives in Lisbon")]
    first = store.write(user, None, facts)
    again = store.write(user, None, facts)
    assert (first.inserted, again.inserted, again.updated, again.unchanged) == (2, 0, 0, 2)
    assert len(rows(pg, user)) == 2 and len(r.keys(f"memory:{user}:*")) == 2


def test_a_near_duplicate_memory_updates_the_existing_one_instead_of_inserting(
    store: MemoryStore, pg: psycopg.Connection[Any], r: redis.Redis, user: str
) -> None:
    store.write(user, None, [Fact("allergy", "is allergic to peanuts")])
    [(mid, _, _)] = rows(pg, user)
    out = store.write(user, None, [Fact("allergy", "is allergic to peanuts and tree nuts")])
    assert (out.inserted, out.updated) == (0, 1)
    assert rows(pg, user) == [(mid, "allergy", "is allergic to peanuts and tree nuts")]
    assert r.hget(keys.memory(user, mid), "content") == b"is allergic to peanuts and tree nuts"
    # Re-running the refined fact is now a no-op too.
    again = store.write(user, None, [Fact("allergy", "is allergic to peanuts and tree nuts")])
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 1)


def test_a_different_fact_of_the_same_kind_is_a_new_memory(
    store: MemoryStore, pg: psycopg.Connection[Any], user: str, embedder: Embedder,
    r: redis.Redis,
) -> None:
    store.write(user, None, [Fact("location", "lives in Lisbon")])
    out = store.write(user, None, [Fact("location", "lives in Porto")])
    assert out.inserted == 1
    assert [c for _, _, c in rows(pg, user)] == ["lives in Lisbon", "lives in Porto"]
    near = nearest(r, embedder.embed("lives in Lisbon"), user, "location", k=2,
                   model=embedder.model_id)
    assert near[0].content == "lives in Lisbon" and near[0].distance < 0.01
    assert near[1].distance > store.merge_distance


def test_near_duplicates_are_only_merged_within_one_user(
    store: MemoryStore, pg: psycopg.Connection[Any], user: str
) -> None:
    other = f"u-{uuid.uuid4().hex[:12]}"
    store.write(user, None, [Fact("allergy", "is allergic to peanuts")])
    store.write(other, None, [Fact("allergy", "is allergic to peanuts and tree nuts")])
    assert [c for _, _, c in rows(pg, user)] == ["is allergic to peanuts"]
    assert [c for _, _, c in rows(pg, other)] == ["is allergic to peanuts and tree nuts"]


@pytest.mark.anyio
async def test_recall_returns_the_relevant_memory_and_never_another_users(
    store: MemoryStore, settings: Settings, embedder: Embedder, user: str
) -> None:
    other = f"x.{uuid.uuid4().hex[:8]}@example-org"  # tag syntax in the id, escaped
    store.write(user, None, [Fact("location", "lives in Lisbon"),
                             Fact("allergy", "is allergic to peanuts")])
    store.write(other, None, [Fact("location", "lives in Porto")])
    client = async_redis_client(settings.redis_url or "")
    try:
        found = await recall(client, embedder, user, "Where do I live?")
        assert found == ["location: lives in Lisbon"]
        assert await make_recall(client, embedder)(other, "Where do I live?") == [
            "location: lives in Porto"
        ]
        assert await recall(client, embedder, f"u-{uuid.uuid4().hex[:12]}", "Where?") == []
    finally:
        await client.aclose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app) as c:
        yield c


def test_memory_routes_list_newest_first_and_delete_from_both_stores(
    client: TestClient, store: MemoryStore, pg: psycopg.Connection[Any], r: redis.Redis,
    user: str, token_for: Headers,
) -> None:
    store.write(user, None, [Fact("location", "lives in Lisbon")])
    store.write(user, None, [Fact("work", "works at Acme")])
    listed = client.get("/v1/memories", headers=token_for(user))
    assert listed.status_code == 200
    body = listed.json()["memories"]
    assert [m["content"] for m in body] == ["works at Acme", "lives in Lisbon"]
    mid = body[0]["id"]
    assert client.delete(f"/v1/memories/{mid}", headers=token_for(user)).status_code == 204
    assert [c for _, _, c in rows(pg, user)] == ["lives in Lisbon"]
    assert not r.exists(keys.memory(user, mid))
    assert client.delete(f"/v1/memories/{mid}", headers=token_for(user)).status_code == 404


def test_memory_routes_refuse_bad_ids_missing_tokens_and_other_users_memories(
    client: TestClient, store: MemoryStore, pg: psycopg.Connection[Any], user: str,
    token_for: Headers,
) -> None:
    store.write(user, None, [Fact("location", "lives in Lisbon")])
    [(mid, _, _)] = rows(pg, user)
    assert client.get("/v1/memories").status_code == 401
    assert client.delete(f"/v1/memories/{mid}").status_code == 401
    bad = client.delete("/v1/memories/NOT-HEX", headers=token_for(user))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_memory_id"
    intruder = f"u-{uuid.uuid4().hex[:12]}"
    stolen = client.delete(f"/v1/memories/{mid}", headers=token_for(intruder))
    assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "not_found"
    assert client.get("/v1/memories", headers=token_for(intruder)).json() == {"memories": []}
    assert len(rows(pg, user)) == 1


def _ids(pg: psycopg.Connection[Any], user: str) -> set[str]:
    return {i for i, _, _ in rows(pg, user)}


def _indexed(r: redis.Redis, embedder: Embedder, user: str) -> set[str]:
    """The user's memories as idx:memory finds them (the recall copy, not just a hash)."""
    vector = embedder.embed_many(["anything"])[0]
    return {n.id for n in nearest(r, vector, user, k=50, model=embedder.model_id)}


_CAPPED = [Fact("location", "lives in Lisbon"), Fact("allergy", "is allergic to peanuts"),
           Fact("work", "works at Acme"), Fact("plan", "plans to visit Kyoto")]


@pytest.mark.anyio
async def test_past_the_per_user_cap_the_least_recently_used_memory_goes_row_and_index_entry(
    r: redis.Redis, pg: psycopg.Connection[Any], embedder: Embedder, settings: Settings,
    user: str,
) -> None:
    capped = MemoryStore(r, pg, embedder, max_per_user=3)
    lookalike = user.upper()  # same letters, another user: never evicted for this one
    MemoryStore(r, pg, embedder).write(lookalike, None, _CAPPED[:3])
    for fact in _CAPPED[:3]:  # one write each: Lisbon oldest, then peanuts, then Acme
        capped.write(user, None, [fact])
    lisbon, peanuts, acme = (memory_id(user, f.kind, f.content) for f in _CAPPED[:3])
    # A turn recalls Lisbon: it becomes the most recently used, peanuts the least.
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=1, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    client = async_redis_client(settings.redis_url or "")
    try:
        marks = UsageMarks(pool)
        assert await recall(client, embedder, user, "Where do I live?", 1, marks=marks) == [
            "location: lives in Lisbon"]
        assert marks.pending == 1 and await marks.flush() == 1
    finally:
        await client.aclose()
        await pool.close()
    out = capped.write(user, None, [_CAPPED[3]])
    kyoto = memory_id(user, "plan", "plans to visit Kyoto")
    assert (out.inserted, out.evicted) == (1, 1)
    assert _ids(pg, user) == {lisbon, acme, kyoto}
    assert not r.exists(keys.memory(user, peanuts))
    assert _indexed(r, embedder, user) == {lisbon, acme, kyoto}
    assert len(_ids(pg, lookalike)) == 3 and len(_indexed(r, embedder, lookalike)) == 3


def test_an_exact_repeat_counts_as_a_use_and_is_not_the_one_evicted(
    r: redis.Redis, pg: psycopg.Connection[Any], embedder: Embedder, user: str
) -> None:
    capped = MemoryStore(r, pg, embedder, max_per_user=2)
    capped.write(user, None, [_CAPPED[0]])
    capped.write(user, None, [_CAPPED[1]])
    assert capped.write(user, None, [_CAPPED[0]]).unchanged == 1  # said again: used
    capped.write(user, None, [_CAPPED[2]])
    assert _ids(pg, user) == {memory_id(user, f.kind, f.content) for f in (_CAPPED[0], _CAPPED[2])}


def test_two_writers_of_one_user_racing_past_the_cap_leave_exactly_the_cap(
    r: redis.Redis, embedder: Embedder, settings: Settings, user: str
) -> None:
    facts = [Fact("preference", f"likes {w}") for w in (
        "sailing", "chess", "opera", "gardening", "pottery", "climbing", "baking", "karaoke")]

    def write(half: list[Fact]) -> None:
        with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
            for fact in half:  # one write per fact: the two writers interleave
                MemoryStore(r, conn, embedder, max_per_user=5).write(user, None, [fact])

    threads = [threading.Thread(target=write, args=(facts[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        left = _ids(conn, user)
    assert len(left) == 5
    assert {k.decode().rsplit(":", 1)[-1] for k in r.keys(f"memory:{user}:*")} == left


@pytest.mark.anyio
async def test_use_marks_touch_only_the_named_users_row_in_one_batch(
    store: MemoryStore, pg: psycopg.Connection[Any], settings: Settings, user: str
) -> None:
    store.write(user, None, [_CAPPED[0]])
    mid = memory_id(user, _CAPPED[0].kind, _CAPPED[0].content)
    before = pg.execute("SELECT used_at FROM memories WHERE id = %s", (mid,)).fetchone()
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=1, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    try:
        marks = UsageMarks(pool)
        marks.mark(user.upper(), [mid])  # the id with a lookalike user: not this row
        marks.mark("u-nobody", ["0" * 32])
        assert await marks.flush() == 0 and marks.pending == 0
        marks.mark(user, [mid])
        marks.mark(user, [mid])  # twice in a batch: one mark
        assert await marks.flush() == 1
    finally:
        await pool.close()
    after = pg.execute("SELECT used_at FROM memories WHERE id = %s", (mid,)).fetchone()
    assert before is not None and after is not None and after[0] > before[0]
