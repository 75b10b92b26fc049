"""No endpoint answers without a valid token; one user never reads, writes, deletes,
or receives cached private results of another.

"Another" includes ids that differ from alice's only in case (`Alice-...`,
`ALICE-...`: other accounts, never folded onto hers) and Unicode lookalikes
(Cyrillic U+0430 for `a`, fullwidth U+FF41: not valid ids, so their tokens are refused).

The route walks read `app.api.routes()`, so a new route is covered the day it is
added: a `/v1` route with a path parameter this file does not know fails loudly
until someone says which of alice's resources it names.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import redis
from sse import Frame
from starlette.routing import Route
from starlette.testclient import TestClient
from test_fuzz import _turn, assert_error_body, snapshot

from app import api
from app.auth import issue_token
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.memory.facts import Fact
from app.memory.store import MemoryStore
from app.settings import Settings

Headers = Callable[[str], dict[str, str]]

# Who "bob" is in the walks: a fresh id, or alice's own id in another case.
OTHERS: dict[str, Callable[[str, str], str]] = {  # (alice's id, a fresh id) -> bob's
    "fresh": lambda alice, fresh: fresh,
    "Capitalised": lambda alice, fresh: alice.capitalize(),
    "UPPER": lambda alice, fresh: alice.upper(),
    "mIxEd": lambda alice, fresh: "".join(c.upper() if i % 2 else c for i, c in enumerate(alice)),
}
CASE_VARIANTS = [name for name in OTHERS if name != "fresh"]
# Ids that render like alice's but are other code points; none is a valid user id.
LOOKALIKES: dict[str, Callable[[str], str]] = {
    "cyrillic-a": lambda alice: "\u0430" + alice[1:],
    "fullwidth-a": lambda alice: "\uff41" + alice[1:],
    "dotless-i": lambda alice: alice.replace("i", "\u0131", 1),
    "zero-width": lambda alice: alice + "\u200b",
}

# The only routes that answer without a token.
PUBLIC = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}

SECRET = "the zebra vault combination is 4417-PLUM-ORCHID"
PRIVATE_DOC = f"""# Zebra vault

Alice keeps her notes on the zebra vault here. {SECRET[0].upper() + SECRET[1:]}. Only Alice
may read the zebra vault combination; it opens the vault in the north wing.
"""
QUESTION = "What is the zebra vault combination?"


@dataclasses.dataclass(frozen=True)
class Alice:
    user: str
    headers: dict[str, str]
    sid: str
    memory_id: str
    event_ids: list[str]
    frames: list[Frame]


def _endpoints() -> list[tuple[str, str]]:
    """Every (method, path template) the app serves."""
    out = []
    for route in api.routes():
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            out.append((method, route.path))
    return out


def _fill(path: str, alice: Alice) -> str:
    """A concrete path naming alice's resource for every parameter."""
    # The OpenAI-compatible face names her session as a conversation, her turn as a response.
    values = {"sid": alice.sid, "mid": alice.memory_id, "cid": f"conv_{alice.sid}",
              "rid": f"resp_{alice.sid}_0"}
    for name in re.findall(r"{(\w+)(?::\w+)?}", path):
        assert name in values, f"{path}: say which of alice's resources {{{name}}} names"
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: values[m[1]], path)


def _openai(template: str) -> bool:
    """A route of the OpenAI-compatible face: errors in OpenAI's shape."""
    return template.startswith(("/v1/conversations", "/v1/responses"))


def _send(client: TestClient, method: str, path: str, alice: Alice,
          headers: dict[str, str]) -> Any:
    extra = {"Last-Event-ID": alice.event_ids[0]} if path.endswith("/events") else {}
    return client.request(method, path, headers={**headers, **extra},
                          json={"content": QUESTION}, follow_redirects=False)


@pytest.fixture(scope="module")
def rm(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url or "")
    yield client
    client.close()


@pytest.fixture(scope="module")
def alice(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Alice:
    """Alice: a private kb document, a session with one answered turn, one memory."""
    user = f"alice-{uuid.uuid4().hex[:10]}"
    folder: Path = tmp_path_factory.mktemp("alice-kb")
    (folder / "zebra-vault.md").write_text(PRIVATE_DOC)
    ingest_paths(rm, shared_embedder(), [folder], scope=f"user:{user}", progress=False)

    h = {"Authorization": f"Bearer {issue_token(settings.auth_secret or '', user)}"}
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    got = _turn(client, rm, pg, sid, h, {"content": QUESTION})
    MemoryStore(rm, pg, shared_embedder()).write(user, sid, [Fact("note", SECRET)])
    mid = pg.execute("SELECT id FROM memories WHERE user_id = %s", (user,)).fetchone()
    assert mid is not None
    return Alice(user, h, sid, mid[0], [f.id or "" for f in got], got)


def test_every_route_outside_the_public_few_is_under_v1() -> None:
    for method, path in _endpoints():
        assert (method, path) in PUBLIC or path.startswith("/v1/"), (method, path)


@pytest.mark.parametrize("auth", ["none", "garbage", "expired", "forged", "basic"])
def test_no_v1_route_answers_without_a_valid_token(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    settings: Settings, auth: str,
) -> None:
    past = int(time.time()) - 60
    headers = {
        "none": {},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "expired": {"Authorization": "Bearer " + jwt.encode(
            {"sub": alice.user, "exp": past}, settings.auth_secret or "", "HS256")},
        "forged": {"Authorization": "Bearer " + jwt.encode(
            {"sub": alice.user}, "some-other-secret-that-is-long-enough", "HS256")},
        "basic": {"Authorization": "Basic YWxpY2U6eA=="},
    }[auth]
    _assert_every_v1_route_refuses(client, rm, pg, alice, headers)


@pytest.mark.parametrize("lookalike", list(LOOKALIKES))
def test_a_token_for_a_unicode_lookalike_of_alice_is_refused_never_mapped_onto_her(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    settings: Settings, lookalike: str,
) -> None:
    sub = LOOKALIKES[lookalike](alice.user)
    assert sub != alice.user
    with pytest.raises(ValueError):
        issue_token(settings.auth_secret or "", sub)  # never issued
    # Signed with the real secret and not expired: only the subject is wrong.
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 3600},
                       settings.auth_secret or "", "HS256")
    _assert_every_v1_route_refuses(client, rm, pg, alice, {"Authorization": f"Bearer {token}"})


def _assert_every_v1_route_refuses(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    headers: dict[str, str],
) -> None:
    """401 `unauthorized` on every /v1 route, each naming alice's resources; nothing changes."""
    before = snapshot(rm, pg, alice.user)
    for method, template in _endpoints():
        if not template.startswith("/v1/"):
            continue
        res = _send(client, method, _fill(template, alice), alice, headers)
        assert res.status_code == 401, (method, template, res.status_code, res.text[:200])
        assert assert_error_body(res, openai=_openai(template))["code"] == "unauthorized"
        assert SECRET not in res.text and "PLUM-ORCHID" not in res.text
    assert snapshot(rm, pg, alice.user) == before


@pytest.mark.parametrize("other", list(OTHERS))
def test_another_user_is_refused_on_every_route_naming_alices_resources(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    token_for: Headers, user: str, other: str,
) -> None:
    bob = token_for(OTHERS[other](alice.user, user))
    client.post("/v1/sessions", headers=bob)  # bob exists and has his own session
    before = snapshot(rm, pg, alice.user)
    named = [(m, t) for m, t in _endpoints() if "{" in t]
    assert named, "no route names a resource?"
    for method, template in named:
        res = _send(client, method, _fill(template, alice), alice, bob)
        assert res.status_code in (403, 404), (method, template, res.status_code, res.text[:200])
        body = assert_error_body(res, openai=_openai(template))
        assert SECRET not in res.text and alice.user not in body["message"]
    assert snapshot(rm, pg, alice.user) == before
    # Alice still has everything.
    assert client.get(f"/v1/sessions/{alice.sid}", headers=alice.headers).status_code == 200
    mids = [m["id"] for m in client.get("/v1/memories", headers=alice.headers).json()["memories"]]
    assert alice.memory_id in mids


@pytest.mark.parametrize("other", list(OTHERS))
def test_routes_that_name_nothing_never_show_another_users_items(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    token_for: Headers, user: str, other: str,
) -> None:
    bob = token_for(OTHERS[other](alice.user, user))
    for method, template in _endpoints():
        if "{" in template or not template.startswith("/v1/") or method != "GET":
            continue
        res = client.get(template, headers=bob)
        assert res.status_code == 200, (template, res.text[:200])
        for private in (alice.sid, alice.memory_id, alice.user, SECRET, "PLUM-ORCHID"):
            assert private not in res.text, (template, private)


def test_the_event_stream_of_alices_turn_refuses_bob_for_every_event_id(
    client: TestClient, alice: Alice, token_for: Headers, user: str,
) -> None:
    bob = token_for(user)
    for event_id in alice.event_ids:
        res = client.get(f"/v1/sessions/{alice.sid}/events",
                         headers={**bob, "Last-Event-ID": event_id})
        assert res.status_code == 403, event_id
        assert "event:" not in res.text and SECRET not in res.text
        res = client.get(f"/v1/sessions/{alice.sid}/events", headers=bob,
                         params={"after": event_id})
        assert res.status_code == 403, event_id


def _tool_results(frames: list[Frame]) -> list[dict[str, Any]]:
    return [f.data for f in frames if f.event == "tool.result"]


def test_a_private_kb_document_reaches_its_owner_and_never_another_user_even_from_the_cache(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    token_for: Headers, user: str,
) -> None:
    # Alice asked first (the fixture): her answer quotes her private document.
    alice_history = client.get(f"/v1/sessions/{alice.sid}", headers=alice.headers).json()
    assert "PLUM-ORCHID" in json.dumps(alice_history)
    assert "PLUM-ORCHID" in "".join(f.data.get("text", "") for f in alice.frames
                                    if f.event == "message.delta")

    # Bob asks the exact same question right after: neither the search nor a cached
    # result of alice's may hand him the document.
    bob = token_for(user)
    sid = client.post("/v1/sessions", headers=bob).json()["id"]
    got = _turn(client, rm, pg, sid, bob, {"content": QUESTION})
    # The global part is shared on purpose; no private part may come from a cache entry
    # (bob has no document of his own, so his private part is not even run).
    assert _tool_results(got)
    assert not any("user" in t.get("cached_parts", ()) for t in _tool_results(got))
    streamed = json.dumps([f.data for f in got])
    history = json.dumps(client.get(f"/v1/sessions/{sid}", headers=bob).json())
    for text in (streamed, history):
        assert "plum-orchid" not in text.lower() and "north wing" not in text

    # The cache is live (alice's repeat is a hit), so bob's miss above was a real refusal.
    again = _turn(client, rm, pg, alice.sid, alice.headers, {"content": QUESTION})
    assert any(t["cached"] for t in _tool_results(again))
    assert "PLUM-ORCHID" in json.dumps([f.data for f in again])


def test_case_variant_ids_read_nothing_of_alices_on_any_path(
    client: TestClient, rm: redis.Redis, pg: psycopg.Connection[Any], alice: Alice,
    token_for: Headers, user: str,
) -> None:
    """The privacy figure: every way a case variant of alice could read her data, counted.

    A read is a route naming her resources that does not refuse, any response that
    shows her private text, session or memory id, or a chat turn whose retrieval
    (kb_search over her private document, the cache, memory recall) brings any of it
    back or serves its private part from a cache entry, which for a new user can only be
    someone else's (the global part is shared on purpose).
    """
    private = (SECRET, "plum-orchid", "north wing", alice.sid, alice.memory_id)

    def shows(text: str) -> bool:
        return any(p.lower() in text.lower() for p in private)

    attempts, reads = 0, []
    for variant in CASE_VARIANTS:
        other = OTHERS[variant](alice.user, user)
        assert other != alice.user and other.lower() == alice.user.lower()
        h = token_for(other)
        for method, template in _endpoints():
            if "{" in template:
                res = _send(client, method, _fill(template, alice), alice, h)
                leaked = res.status_code not in (403, 404) or shows(res.text)
            elif template.startswith("/v1/") and method == "GET":
                leaked = shows(client.get(template, headers=h).text)
            else:
                continue
            attempts += 1
            if leaked:
                reads.append((variant, method, template))
        sid = client.post("/v1/sessions", headers=h).json()["id"]
        got = _turn(client, rm, pg, sid, h, {"content": QUESTION})
        assert _tool_results(got), "the turn searched nothing: the walk proves nothing"
        attempts += 1
        text = json.dumps([f.data for f in got]) + client.get(f"/v1/sessions/{sid}", headers=h).text
        # A new user's own part can only come from someone else's entry; the global part may
        # (`cached` is then true: the shared global part, with no private part to run).
        own = [t for t in _tool_results(got) if "user" in t.get("cached_parts", ())]
        if shows(text) or own:
            reads.append((variant, "POST", "a chat turn"))
    print(f"\ncross-user reads with case-variant ids: {len(reads)} (of {attempts} attempts)")
    assert reads == []
    assert attempts > 3 * len(CASE_VARIANTS)
