"""Per-user rate limit on message posts: a Lua sliding window, 429 with Retry-After."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import redis
from starlette.testclient import TestClient

from app.api import create_app
from app.settings import Settings
from app.stores import scripts
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = BOTH_TOPOLOGIES
Headers = Callable[[str], dict[str, str]]


def test_the_window_admits_the_limit_then_refuses_until_the_oldest_post_ages_out(
    sr: redis.Redis, user: str
) -> None:
    def post(now: int, n: int) -> tuple[int, int]:
        return scripts.run(sr, scripts.rate_limit(user, now, 60_000, 3, f"m{n}"))

    assert [post(1_000, 1), post(2_000, 2), post(3_000, 3)] == [(1, 2), (1, 1), (1, 0)]
    assert post(10_000, 4) == (0, 51_000)  # the post at 1 s frees its slot at 61 s
    assert post(60_999, 5)[0] == 0
    assert post(61_000, 6) == (1, 0)


def test_a_user_over_the_limit_gets_429_with_retry_after_and_nothing_is_appended(
    settings: Settings, token_for: Headers, user: str
) -> None:
    tight = dataclasses.replace(settings, rate_limit_messages=2, offline_token_delay_ms=0)
    with TestClient(create_app(tight)) as c:
        h = token_for(user)
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        for _ in range(2):
            with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                          json={"content": "hello"}) as res:
                assert res.status_code == 200
                res.read()
        before = c.get(f"/v1/sessions/{sid}", headers=h).json()["messages"]
        refused = c.post(f"/v1/sessions/{sid}/messages", headers=h, json={"content": "again"})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert c.get(f"/v1/sessions/{sid}", headers=h).json()["messages"] == before

        other = token_for(f"{user}-other")
        sid2 = c.post("/v1/sessions", headers=other).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid2}/messages", headers=other,
                      json={"content": "hello"}) as res:
            assert res.status_code == 200, "one user's limit never throttles another"
            res.read()


def test_creating_sessions_past_the_limit_gets_429_with_retry_after_and_creates_nothing(
    settings: Settings, token_for: Headers, user: str
) -> None:
    tight = dataclasses.replace(settings, rate_limit_sessions=3)
    with TestClient(create_app(tight)) as c:
        h = token_for(user)
        made = [c.post("/v1/sessions", headers=h) for _ in range(3)]
        assert [res.status_code for res in made] == [201, 201, 201]
        refused = c.post("/v1/sessions", headers=h)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= tight.rate_limit_window_seconds
        listed = c.get("/v1/sessions", headers=h).json()["sessions"]
        assert sorted(s["id"] for s in listed) == sorted(res.json()["id"] for res in made)

        other = token_for(f"{user}-other")
        assert c.post("/v1/sessions", headers=other).status_code == 201, (
            "one user's limit never throttles another"
        )


def test_session_creations_and_message_posts_count_in_separate_windows(
    settings: Settings, token_for: Headers, user: str
) -> None:
    tight = dataclasses.replace(
        settings, rate_limit_sessions=1, rate_limit_messages=1, offline_token_delay_ms=0
    )
    with TestClient(create_app(tight)) as c:
        h = token_for(user)
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                      json={"content": "hello"}) as res:
            assert res.status_code == 200, "creating a session spent no message allowance"
            res.read()
        assert c.post("/v1/sessions", headers=h).status_code == 429
