"""Hostile input on every endpoint: never a 5xx, every 4xx the JSON error body, and
a rejected request changes nothing (the caller's Redis keys and PostgreSQL rows,
and the number of session and event-log keys, are the same before and after).

Plus the size limits, explicitly: message length, body size, a full session,
and content that is odd but legal (unicode, control characters, emoji) kept exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import jwt
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sse import Frame, frames
from starlette.testclient import TestClient
from waits import settle

from app import limits
from app.sessions import messages
from app.settings import Settings
from app.stores import keys

Headers = Callable[[str], dict[str, str]]
Snapshot = dict[str, Any]

FUZZ = hsettings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------- fixtures


@dataclasses.dataclass(frozen=True)
class Owned:
    """A user with one session that has one completed turn (so an event log exists)."""

    user: str
    headers: dict[str, str]
    sid: str
    event_ids: list[str]


@pytest.fixture
def owned(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], token_for: Headers, user: str
) -> Owned:
    h = token_for(user)
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    got = _turn(client, r, pg, sid, h, {"content": "What does appendfsync everysec do?"})
    return Owned(user, h, sid, [f.id or "" for f in got])


# ---------------------------------------------------------------- helpers


def _turn(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], sid: str,
    h: dict[str, str], body: Any,
) -> list[Frame]:
    with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h, json=body) as res:
        assert res.status_code == 200, res.read()
        got = frames(res.iter_lines())
    assert got and got[-1].event in {"message.done", "error"}
    settle(r, pg, sid)
    return got




def _count(r: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in r.scan_iter(match=pattern, count=1000))


def snapshot(r: redis.Redis, pg: psycopg.Connection[Any], user: str) -> Snapshot:
    """What a rejected request must leave alone."""
    sids = [row[0] for row in pg.execute(
        "SELECT id FROM sessions WHERE user_id = %s ORDER BY id", (user,))]
    live: dict[str, Any] = {}
    for sid in sids:
        raw = r.execute_command("JSON.GET", keys.session(sid), "$")  # type: ignore[no-untyped-call]
        live[sid] = (raw, r.get(keys.session_user(sid)),
                     sorted(r.scan_iter(match=f"events:{{{sid}}}:*")))
    counts = pg.execute(
        "SELECT (SELECT count(*) FROM sessions),"
        " (SELECT count(*) FROM messages m JOIN sessions s ON s.id = m.session_id"
        "  WHERE s.user_id = %s),"
        " (SELECT count(*) FROM memories WHERE user_id = %s)",
        (user, user),
    ).fetchone()
    return {
        "sessions": sids,
        "live": live,
        "pg_counts": counts,
        "session_keys": _count(r, "session:*"),
        "event_keys": _count(r, "events:*"),
        "memory_keys": sorted(r.scan_iter(match=f"memory:{user}:*")),
    }


def assert_error_body(res: Any, *, openai: bool = False) -> dict[str, str]:
    """The error body of a native route, or with `openai` of the OpenAI-compatible face
    (`message`, `type`, `param`, `code`; param is null unless a field is at fault)."""
    body = res.json()
    assert set(body) == {"error"}, body
    error = dict(body["error"])
    if openai:
        assert set(error) == {"code", "message", "type", "param"}, body
        assert error.pop("param") is None or isinstance(body["error"]["param"], str), body
    else:
        assert set(error) == {"code", "message"}, body
    assert all(isinstance(v, str) and v for v in error.values()), body
    return dict(body["error"])


def exchange(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], user: str,
    method: str, url: str, **kw: Any,
) -> Any:
    """Send one request; check no 5xx, the error body on a 4xx, and no change on a 4xx."""
    before = snapshot(r, pg, user)
    res = client.request(method, url, follow_redirects=False, **kw)
    assert res.status_code < 500, (method, url, res.status_code, res.text[:500])
    if 400 <= res.status_code < 500:
        assert_error_body(res)
        after = snapshot(r, pg, user)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        assert not changed, (method, url, res.status_code, changed)
    return res


# ---------------------------------------------------------------- strategies

HOSTILE_CHARS = st.sampled_from(
    ["*", "}", "{", ":", "\n", "\r", "%00", "\x00", "?", "#", "..", "/", "\\", " ", "%",
     "é", "你", "\U0001f600", "\u202e", "\ufeff", "$", "[", "]", "'", '"', "|", "@"]
)

hostile_text: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(HOSTILE_CHARS, st.text(max_size=3)), max_size=12).map("".join),
    st.integers(1, 5000).map(lambda n: "a" * n),
    st.just(""),
    st.sampled_from(["*", "}", "{", ":", "0" * 31 + "}", "0" * 32 + "\n", "A" * 32,
                     "0" * 33, "%7B%7D", "{" + "0" * 30 + "}"]),
)


def path_segment(text: str, raw: bool) -> str:
    """Percent-encode everything, or only what would leave the path segment."""
    return quote(text, safe="" if not raw else "*{}:@$'[]|")


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
content_text: st.SearchStrategy[str] = st.one_of(
    st.text(min_size=1, max_size=60),
    st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=60),
    st.lists(st.one_of(st.text(max_size=5), SURROGATES, HOSTILE_CHARS), min_size=1,
             max_size=10).map("".join),
)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | SURROGATES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates become \\udXXX escapes


raw_bodies: st.SearchStrategy[bytes] = st.one_of(
    json_values.map(_dumps),
    st.dictionaries(st.sampled_from(["content", "role", "seq"]), json_values, min_size=1)
    .map(_dumps),
    content_text.map(lambda c: _dumps({"content": c})),
    st.binary(max_size=200),
    st.integers(1, 30_000).map(lambda n: b"[" * n),
    st.integers(1, 30_000).map(lambda n: b'{"content":' * n),
    st.integers(1, 30_000).map(lambda n: b'{"content": ' + b"9" * n + b"}"),
    st.sampled_from([b"NaN", b'{"content": NaN}', b'{"content": 1e999999}', b"",
                     b'{"content": "\\ud800"}', b'{"content": "a\\u0000b"}',
                     b"\xff\xfe{}", b'{"content": "x"', b"null"]),
)

HEADER_BYTES = st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)


def _token(claims: dict[str, Any], secret: str) -> str:
    return jwt.encode(claims, secret, "HS256")


def auth_headers(secret: str) -> st.SearchStrategy[dict[str, Any]]:
    """Authorization values that must all be refused (401), never crash."""
    claims = st.fixed_dictionaries({"sub": st.one_of(hostile_text, json_values)},
                                   optional={"exp": json_values, "iat": json_values})
    signed = claims.filter(lambda c: not (isinstance(c["sub"], str)
                                          and keys.USER_ID.fullmatch(c["sub"])))
    values: st.SearchStrategy[Any] = st.one_of(
        HEADER_BYTES,
        HEADER_BYTES.map(lambda b: b"Bearer " + b),
        st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=40)
        .map(lambda t: f"Bearer {t}"),
        signed.map(lambda c: f"Bearer {_token(c, secret)}"),
        st.just(f"Bearer {jwt.encode({'sub': 'alice'}, '', algorithm='none')}"),
        st.just("Bearer a.b.c"),
        st.just("bearer"),
    )
    return values.map(lambda v: {"Authorization": v})


# ---------------------------------------------------------------- fuzz, one test per route


@FUZZ
@given(segment=hostile_text, raw=st.booleans(),
       method=st.sampled_from(["GET", "DELETE", "POST", "EVENTS"]))
def test_a_hostile_session_id_in_the_path_is_a_4xx_and_changes_nothing(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    segment: str, raw: bool, method: str,
) -> None:
    sid = path_segment(segment, raw)
    if method == "EVENTS":
        res = exchange(client, r, pg, owned.user, "GET", f"/v1/sessions/{sid}/events?after=0.0-0",
                       headers=owned.headers)
    elif method == "POST":
        res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{sid}/messages",
                       headers=owned.headers, json={"content": "hello"})
    else:
        res = exchange(client, r, pg, owned.user, method, f"/v1/sessions/{sid}",
                       headers=owned.headers)
    assert res.status_code >= 300  # nobody owns a session with such an id


@FUZZ
@given(segment=hostile_text, raw=st.booleans())
def test_a_hostile_memory_id_is_a_4xx_and_changes_nothing(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    segment: str, raw: bool,
) -> None:
    res = exchange(client, r, pg, owned.user, "DELETE",
                   f"/v1/memories/{path_segment(segment, raw)}", headers=owned.headers)
    assert res.status_code >= 300


@FUZZ
@given(body=raw_bodies, content_type=st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_a_hostile_message_body_never_crashes_and_a_rejected_one_changes_nothing(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    body: bytes, content_type: str,
) -> None:
    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers={**owned.headers, "Content-Type": content_type}, content=body)
    if res.status_code == 200:  # a legal message: the turn ran to its end
        got = frames(res.text.splitlines())
        assert got[-1].event in {"message.done", "error"}
        settle(r, pg, owned.sid)
        history = client.get(f"/v1/sessions/{owned.sid}", headers=owned.headers).json()
        user_turns = [m for m in history["messages"] if m["role"] == "user"]
        assert user_turns[-1]["content"] == json.loads(body)["content"]


def _event_ids(start_ms: int) -> st.SearchStrategy[str]:
    """Ids shaped like `<turn>.<ms>-<n>`, with overflowing and non-ASCII digits mixed in.

    The entry part stays before the turn's first event (or overflows), so a
    well-formed id replays the finished turn instead of waiting for more.
    """
    digits = "0123456789"
    arabic = "٠١٢٣٤٥٦٧٨٩"

    def shape(turn: int, ms: int, n: int, exotic: bool) -> str:
        text = f"{turn}.{ms}-{n}"
        return text.translate(str.maketrans(digits, arabic)) if exotic else text

    return st.one_of(
        hostile_text,
        st.builds(shape, st.integers(0, 10**10), st.integers(0, start_ms - 1),
                  st.integers(0, 2**64 + 5), st.booleans()),
        st.builds(shape, st.integers(0, 3), st.integers(2**64, 10**20 - 1),
                  st.integers(0, 5), st.booleans()),
    )


@FUZZ
@given(data=st.data(), via_header=st.booleans())
def test_a_hostile_event_id_is_a_4xx_or_a_replay_and_changes_nothing(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    data: st.DataObject, via_header: bool,
) -> None:
    start_ms = int(owned.event_ids[0].split(".")[1].split("-")[0])
    event_id = data.draw(_event_ids(start_ms))
    url = f"/v1/sessions/{owned.sid}/events"
    if via_header:
        encoded = event_id.encode("utf-8", "surrogatepass")
        if b"\r" in encoded or b"\n" in encoded:
            return
        res = exchange(client, r, pg, owned.user, "GET", url,
                       headers={**owned.headers, "Last-Event-ID": encoded})
    else:
        res = exchange(client, r, pg, owned.user, "GET", url, headers=owned.headers,
                       params={"after": event_id})
    if res.status_code == 200:
        assert frames(res.text.splitlines())[-1].event in {"message.done", "error"}


@FUZZ
@given(data=st.data(), route=st.sampled_from(
    ["POST /v1/sessions", "GET /v1/sessions", "GET {s}", "DELETE {s}", "POST {s}/messages",
     "GET {s}/events?after=0.0-0", "GET /v1/memories",
     "DELETE /v1/memories/" + "0" * 32, "GET /v1/cache/stats"]))
def test_a_garbage_authorization_header_is_401_and_changes_nothing(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    settings: Settings, data: st.DataObject, route: str,
) -> None:
    headers = data.draw(auth_headers(settings.auth_secret or ""))
    method, _, path = route.partition(" ")
    res = exchange(client, r, pg, owned.user, method,
                   path.replace("{s}", f"/v1/sessions/{owned.sid}"),
                   headers=headers, json={"content": "hi"})
    assert res.status_code == 401, (headers, res.text)
    assert assert_error_body(res)["code"] == "unauthorized"


@FUZZ
@given(query=st.dictionaries(hostile_text, hostile_text, max_size=3),
       route=st.sampled_from(["POST /v1/sessions", "GET /v1/sessions", "GET {s}",
                              "GET /v1/memories", "DELETE /v1/memories/" + "1" * 32,
                              "GET /v1/cache/stats"]))
def test_hostile_query_strings_and_bodies_on_the_other_routes_never_crash(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    query: dict[str, str], route: str,
) -> None:
    method, _, path = route.partition(" ")
    exchange(client, r, pg, owned.user, method,
             path.replace("{s}", f"/v1/sessions/{owned.sid}"), headers=owned.headers,
             params=query, content=json.dumps(query).encode())


# ---------------------------------------------------------------- size limits


def test_a_message_one_character_over_the_limit_is_413_payload_too_large(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
) -> None:
    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers=owned.headers, json={"content": "é" * (limits.MAX_MESSAGE_CHARS + 1)})
    assert res.status_code == 413
    assert assert_error_body(res)["code"] == "payload_too_large"


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_max_body_bytes_is_413_whether_or_not_its_length_is_declared(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
    declared: bool,
) -> None:
    body = json.dumps({"content": "a", "pad": "x" * limits.MAX_BODY_BYTES}).encode()

    def chunks() -> Iterator[bytes]:  # a generator body is sent chunked, with no length
        yield body[: len(body) // 2]
        yield body[len(body) // 2:]

    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers=owned.headers, content=body if declared else chunks())
    assert res.status_code == 413
    assert assert_error_body(res)["code"] == "payload_too_large"


def test_a_session_at_max_session_messages_is_413_session_full(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], token_for: Headers,
    user: str,
) -> None:
    h = token_for(user)
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    filled = [messages.build(sid, i, "user", f"m{i}")
              for i in range(limits.MAX_SESSION_MESSAGES)]
    r.execute_command("JSON.SET", keys.session(sid), "$", json.dumps(filled))  # type: ignore[no-untyped-call]
    res = exchange(client, r, pg, user, "POST", f"/v1/sessions/{sid}/messages",
                   headers=h, json={"content": "one more"})
    assert res.status_code == 413
    assert assert_error_body(res)["code"] == "session_full"
    assert r.execute_command("JSON.ARRLEN", keys.session(sid), "$") == [limits.MAX_SESSION_MESSAGES]  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("content", [
    "naïve café — 你好 — こんにちは — مرحبا — \U0001f600\U0001f44d\U0001f3fd\u200d\U0001f9d1",
    "tab\there\r\nnew line\x07bell\x1b[31mescape\x7f\u2028\u2029",
    "\u202eright-to-left override\ufeff zero width\u200b joiner",
    "x" * limits.MAX_MESSAGE_CHARS,
])
def test_odd_but_legal_content_is_accepted_and_round_trips_exactly(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned, content: str
) -> None:
    _turn(client, r, pg, owned.sid, owned.headers, {"content": content})
    history = client.get(f"/v1/sessions/{owned.sid}", headers=owned.headers).json()["messages"]
    stored = [m for m in history if m["role"] == "user"][-1]
    assert stored["content"] == content
    row = pg.execute("SELECT body FROM messages WHERE session_id = %s AND seq = %s",
                     (owned.sid, stored["seq"])).fetchone()
    assert row is not None
    body = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    assert body["content"] == content


def test_a_nul_character_in_content_is_422(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
) -> None:
    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers=owned.headers, json={"content": "before\x00after"})
    assert res.status_code == 422
    assert assert_error_body(res)["code"] == "invalid_body"


# ---------------------------------------------------------------- regressions, one per bug


def test_a_body_nested_past_the_parser_depth_is_422_not_a_crash(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
) -> None:
    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers=owned.headers, content=b"[" * 50_000)
    assert res.status_code == 422
    assert assert_error_body(res)["code"] == "invalid_body"


def test_content_with_a_lone_surrogate_is_422_not_a_crash(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
) -> None:
    res = exchange(client, r, pg, owned.user, "POST", f"/v1/sessions/{owned.sid}/messages",
                   headers=owned.headers, content=b'{"content": "half a pair \\ud800 here"}')
    assert res.status_code == 422
    assert assert_error_body(res)["code"] == "invalid_body"


@pytest.mark.parametrize("after", ["0.1-18446744073709551616", "0.18446744073709551616-0",
                                   "0.\u0661-0", "\u0661.1-0", "0.1-\uff11"])
def test_an_event_id_redis_cannot_parse_is_400_not_a_crash(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned, after: str,
) -> None:
    res = exchange(client, r, pg, owned.user, "GET", f"/v1/sessions/{owned.sid}/events",
                   headers=owned.headers, params={"after": after})
    assert res.status_code == 400
    assert assert_error_body(res)["code"] == "invalid_event_id"


def test_resuming_after_the_terminal_event_is_404_at_once_instead_of_hanging(
    client: TestClient, r: redis.Redis, pg: psycopg.Connection[Any], owned: Owned,
) -> None:
    started = time.monotonic()
    res = exchange(client, r, pg, owned.user, "GET", f"/v1/sessions/{owned.sid}/events",
                   headers={**owned.headers, "Last-Event-ID": owned.event_ids[-1]})
    assert res.status_code == 404
    assert assert_error_body(res)["code"] == "turn_finished"
    assert time.monotonic() - started < 5  # it used to block for the whole stall window


@pytest.mark.anyio
async def test_a_live_replay_waits_longer_than_the_redis_socket_timeout(
    settings: Settings, r: redis.Redis,
) -> None:
    from app.chat import event_log
    from app.stores.clients import async_redis_client

    sid = keys.new_session_id()
    r.xadd(keys.events(sid, 0), {"event": "message.delta", "data": "{}"}, id="1-0")
    r.expire(keys.events(sid, 0), 60)
    client = async_redis_client(settings.redis_url or "", socket_timeout=1.5)
    try:
        got = [e async for e in event_log.replay(client, sid, 0, "1-0", stall_ms=2_000)]
    finally:
        await client.aclose()
        r.delete(keys.events(sid, 0))
    assert [e.data["code"] for e in got] == ["stream_stalled"]  # not a redis TimeoutError
