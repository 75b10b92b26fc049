"""`/v1/memories` as a service: add, update, search over REST, on the real stores."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from starlette.testclient import TestClient

from app.api import create_app
from app.embeddings import shared_embedder
from app.memory import Fact
from app.memory.store import MemoryStore
from app.settings import Settings
from app.stores import indexes, keys

Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def add(client: TestClient, headers: dict[str, str], content: str, **more: Any) -> Any:
    return client.post("/v1/memories", json={"content": content, **more}, headers=headers)


def search(client: TestClient, headers: dict[str, str], text: str, **more: Any) -> list[Any]:
    res = client.post("/v1/memories/search", json={"text": text, **more}, headers=headers)
    assert res.status_code == 200, res.text
    return list(res.json()["memories"])


def test_adding_a_memory_answers_201_and_stores_it_in_both_stores(
    client: TestClient, user: str, token_for: Headers, pg: psycopg.Connection[Any],
    r: redis.Redis,
) -> None:
    res = add(client, token_for(user), "The user prefers window seats.", kind="preference")
    assert res.status_code == 201, res.text
    body = res.json()
    assert (body["kind"], body["content"], body["session_id"]) == (
        "preference", "prefers window seats", None)
    row = pg.execute("SELECT user_id, content FROM memories WHERE id = %s", (body["id"],))
    assert row.fetchone() == (user, "prefers window seats")
    assert r.hget(keys.memory(user, body["id"]), "kind") == b"preference"


def test_an_exact_or_near_duplicate_answers_200_with_the_existing_id(
    client: TestClient, user: str, token_for: Headers, pg: psycopg.Connection[Any],
) -> None:
    first = add(client, token_for(user), "is allergic to peanuts", kind="allergy").json()
    again = add(client, token_for(user), "  Is allergic to PEANUTS ", kind="allergy")
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    near = add(client, token_for(user), "is allergic to peanuts and tree nuts", kind="allergy")
    assert near.status_code == 200 and near.json()["id"] == first["id"]
    assert near.json()["content"] == "is allergic to peanuts and tree nuts"
    count = pg.execute("SELECT count(*) FROM memories WHERE user_id = %s", (user,)).fetchone()
    assert count == (1,)


@pytest.mark.parametrize("body", [
    {}, {"content": ""}, {"content": "   "}, {"content": 7}, {"content": "x" * 201},
    {"content": "ok", "kind": "secret"}, {"content": "ok", "extra": 1},
    {"content": "a\x00b"},
])
def test_a_bad_memory_body_is_refused_with_422_and_writes_nothing(
    client: TestClient, user: str, token_for: Headers, pg: psycopg.Connection[Any],
    body: dict[str, Any],
) -> None:
    res = client.post("/v1/memories", json=body, headers=token_for(user))
    assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_body"
    assert pg.execute("SELECT count(*) FROM memories WHERE user_id = %s",
                      (user,)).fetchone() == (0,)


def test_a_memory_may_name_only_one_of_the_callers_own_sessions(
    client: TestClient, user: str, token_for: Headers,
) -> None:
    mine = client.post("/v1/sessions", headers=token_for(user)).json()["id"]
    other = client.post("/v1/sessions", headers=token_for(user.upper())).json()["id"]
    ok = add(client, token_for(user), "works at Acme", kind="work", session_id=mine)
    assert ok.status_code == 201 and ok.json()["session_id"] == mine
    stolen = add(client, token_for(user), "lives in Porto", session_id=other)
    assert stolen.status_code == 404
    bad = add(client, token_for(user), "lives in Porto", session_id="NOT-A-SESSION")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_session_id"


def test_search_finds_the_nearest_memories_first_with_their_fields(
    client: TestClient, user: str, token_for: Headers,
) -> None:
    h = token_for(user)
    for content, kind in [("lives in Lisbon", "location"), ("works at Acme", "work"),
                          ("prefers window seats on long flights", "preference")]:
        assert add(client, h, content, kind=kind).status_code == 201
    found = search(client, h, "What seat does the user like on a plane?")
    assert found[0]["content"] == "prefers window seats on long flights"
    assert set(found[0]) == {"id", "kind", "content", "session_id", "created_at",
                             "updated_at", "score"}
    assert [m["score"] for m in found] == sorted((m["score"] for m in found), reverse=True)
    assert len(search(client, h, "where?", limit=2)) == 2
    assert search(client, h, "What seat?", max_distance=0.0) == []


def test_search_filters_by_kind_session_and_time(
    client: TestClient, user: str, token_for: Headers, r: redis.Redis,
) -> None:
    h = token_for(user)
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    a = add(client, h, "lives in Lisbon", kind="location", session_id=sid).json()
    b = add(client, h, "plans a trip to Kyoto", kind="plan").json()
    assert [m["id"] for m in search(client, h, "Lisbon", kinds=["plan"])] == [b["id"]]
    assert [m["id"] for m in search(client, h, "Kyoto", session_id=sid)] == [a["id"]]
    # An updated_at range: make `a` an hour old in the index, then filter by time.
    hour_ago = time.time() - 3600
    r.hset(keys.memory(user, a["id"]), "updated_at", hour_ago)
    recent = search(client, h, "Lisbon", since=time.time() - 60)
    assert [m["id"] for m in recent] == [b["id"]]
    old = search(client, h, "Lisbon", until="2000-01-01T00:00:00+00:00")
    assert old == []
    between = search(client, h, "Lisbon", since=hour_ago - 1, until=hour_ago + 1)
    assert [m["id"] for m in between] == [a["id"]]


@pytest.mark.parametrize("body", [
    {}, {"text": ""}, {"text": "x", "limit": 0}, {"text": "x", "limit": 101},
    {"text": "x", "limit": True}, {"text": "x", "kinds": "plan"},
    {"text": "x", "kinds": ["nope"]}, {"text": "x", "max_distance": 3},
    {"text": "x", "since": "yesterday"}, {"text": "x", "since": "2026-01-01T00:00:00"},
    {"text": "x", "since": 10, "until": 5}, {"text": "x", "kind": "plan"},
])
def test_a_bad_search_is_refused_with_422(
    client: TestClient, user: str, token_for: Headers, body: dict[str, Any],
) -> None:
    res = client.post("/v1/memories/search", json=body, headers=token_for(user))
    assert res.status_code == 422, res.text


def test_search_never_returns_another_users_memories_not_even_case_or_lookalike_variants(
    client: TestClient, user: str, token_for: Headers,
) -> None:
    secret = "keeps the spare key under the blue flowerpot"
    victim = "Mallory." + user[2:]
    for variant in (victim, victim.lower(), victim.upper(), victim.replace("l", "1"),
                    victim.replace(".", "_")):
        if variant != victim:
            assert add(client, token_for(variant), "likes tea").status_code == 201
    assert add(client, token_for(victim), secret).status_code == 201
    for intruder in (victim.lower(), victim.upper(), victim.replace("l", "1"),
                     victim.replace(".", "_"), victim[:-1]):
        found = search(client, token_for(intruder), "where is the spare key?")
        assert secret not in [m["content"] for m in found], intruder
    assert secret in [m["content"] for m in search(client, token_for(victim), "spare key?")]


def test_update_re_embeds_so_search_finds_the_new_content(
    client: TestClient, user: str, token_for: Headers, r: redis.Redis,
) -> None:
    h = token_for(user)
    m = add(client, h, "lives in Lisbon", kind="location").json()
    res = client.patch(f"/v1/memories/{m['id']}", json={"content": "lives in Osaka"}, headers=h)
    assert res.status_code == 200, res.text
    assert (res.json()["id"], res.json()["content"]) == (m["id"], "lives in Osaka")
    assert r.hget(keys.memory(user, m["id"]), "content") == b"lives in Osaka"
    assert search(client, h, "Which Japanese city?")[0]["id"] == m["id"]
    kind = client.patch(f"/v1/memories/{m['id']}", json={"kind": "plan"}, headers=h)
    assert kind.json()["kind"] == "plan"
    assert [x["id"] for x in search(client, h, "Osaka", kinds=["plan"])] == [m["id"]]


def test_an_update_that_repeats_another_memory_is_refused_with_409_and_changes_nothing(
    client: TestClient, user: str, token_for: Headers, r: redis.Redis,
) -> None:
    h = token_for(user)
    a = add(client, h, "is allergic to peanuts", kind="allergy").json()
    b = add(client, h, "is allergic to shellfish", kind="allergy").json()
    for content in ("is allergic to peanuts", "is allergic to peanuts and tree nuts"):
        res = client.patch(f"/v1/memories/{b['id']}", json={"content": content}, headers=h)
        assert res.status_code == 409, content
        assert res.json()["error"] == {"code": "duplicate_memory", "id": a["id"],
                                       "message": f"memory {a['id']} already says this"}
    assert r.hget(keys.memory(user, b["id"]), "content") == b"is allergic to shellfish"


def test_update_of_another_users_memory_or_a_bad_body_is_refused(
    client: TestClient, user: str, token_for: Headers,
) -> None:
    m = add(client, token_for(user), "works at Acme", kind="work").json()
    for intruder in (user.upper(), user.replace("u-", "u_"), f"u-{uuid.uuid4().hex[:12]}"):
        res = client.patch(f"/v1/memories/{m['id']}", json={"content": "works at Evil"},
                           headers=token_for(intruder))
        assert res.status_code == 404, intruder
        assert client.delete(f"/v1/memories/{m['id']}",
                             headers=token_for(intruder)).status_code == 404
    for body in ({}, {"content": None, "kind": None}, {"content": ""}, {"kind": "x"},
                 {"id": "a" * 32}):
        res = client.patch(f"/v1/memories/{m['id']}", json=body, headers=token_for(user))
        assert res.status_code == 422, body
    assert client.patch("/v1/memories/NOT-HEX", json={"kind": "note"},
                        headers=token_for(user)).status_code == 400
    assert client.post("/v1/memories/search", json={"text": "x"}).status_code == 401
    assert client.post("/v1/memories", json={"content": "x"}).status_code == 401
    listed = client.get("/v1/memories", headers=token_for(user)).json()["memories"]
    assert [x["content"] for x in listed] == ["works at Acme"]


def test_a_delete_arriving_mid_update_wins_and_leaves_no_recall_copy(
    client: TestClient, user: str, token_for: Headers, settings: Settings, r: redis.Redis,
    pg: psycopg.Connection[Any],
) -> None:
    h = token_for(user)
    m = add(client, h, "lives in Lisbon", kind="location").json()
    # Hold the user's write lock so the update waits inside its transaction.
    with psycopg.connect(settings.database_url or "") as holder:
        holder.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("memory:" + user,))
        outcome: dict[str, Any] = {}
        patch = threading.Thread(target=lambda: outcome.setdefault("res", client.patch(
            f"/v1/memories/{m['id']}", json={"content": "lives in Osaka"}, headers=h)))
        patch.start()
        deadline = time.monotonic() + 10
        while not pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                             " AND NOT granted").fetchone()[0]:  # type: ignore[index]
            assert time.monotonic() < deadline, "the update never waited for the lock"
            time.sleep(0.02)
        assert client.delete(f"/v1/memories/{m['id']}", headers=h).status_code == 204
        holder.rollback()
    patch.join(10)
    assert outcome["res"].status_code == 404
    assert not r.exists(keys.memory(user, m["id"]))
    assert client.get("/v1/memories", headers=h).json() == {"memories": []}


def test_memories_written_before_session_tags_are_tagged_once_at_start(
    settings: Settings, user: str, r: redis.Redis, pg: psycopg.Connection[Any],
) -> None:
    sid = uuid.uuid4().hex
    stored = MemoryStore(r, pg, shared_embedder()).write(user, sid, [Fact("note", "owns a cat")])
    key = keys.memory(user, stored.ids[0])
    r.hdel(key, "session")  # as written before the field existed
    r.delete(keys.MEMORY_SESSION_TAGGED)
    assert indexes.tag_memory_sessions(r, pg) >= 1
    assert r.hget(key, "session") == sid.encode()
    assert indexes.tag_memory_sessions(r, pg) == 0  # once: the marker stands
