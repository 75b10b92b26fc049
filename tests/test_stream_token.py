"""The stream token: what a browser's EventSource puts in the URL to resume a turn.

It opens one user's events of one session for minutes, and nothing else: not as a
bearer token, not another session's events, not after it expires; logs mask it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sse import frames
from starlette.testclient import TestClient

from app.auth import issue_stream_token, issue_token
from app.ops import logs
from app.settings import Settings

Headers = Callable[[str], dict[str, str]]


def _turn(client: TestClient, h: dict[str, str]) -> tuple[str, str, list[str]]:
    """A finished turn: (session id, its stream token, its event ids)."""
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                       json={"content": "What is AOF?"}) as res:
        token = res.headers["x-stream-token"]
        ids = [f.id or "" for f in frames(res.iter_lines())]
    return sid, token, ids


def test_the_turn_s_stream_token_resumes_its_events_without_a_header(
    client: TestClient, token_for: Headers, user: str
) -> None:
    sid, token, ids = _turn(client, token_for(user))
    assert len(ids) > 3
    with client.stream("GET", f"/v1/sessions/{sid}/events?after={ids[1]}&token={token}") as res:
        assert res.status_code == 200
        assert [f.id for f in frames(res.iter_lines())] == ids[2:]
    # EventSource's reconnect sends Last-Event-ID, which wins over ?after.
    with client.stream("GET", f"/v1/sessions/{sid}/events?after={ids[0]}&token={token}",
                       headers={"Last-Event-ID": ids[-2]}) as res:
        assert [f.id for f in frames(res.iter_lines())] == ids[-1:]


def test_a_stream_token_opens_nothing_else(
    client: TestClient, settings: Settings, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    sid, token, ids = _turn(client, h)
    other, _, _ = _turn(client, h)
    secret = settings.auth_secret or ""
    refused = [
        # as a bearer token, on any route
        client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"}),
        client.get(f"/v1/sessions/{sid}/events?after={ids[0]}",
                   headers={"Authorization": f"Bearer {token}"}),
        # another session's events, even the same user's
        client.get(f"/v1/sessions/{other}/events?after={ids[0]}&token={token}"),
        # expired
        client.get(f"/v1/sessions/{sid}/events?after={ids[0]}&token="
                   f"{issue_stream_token(secret, user, sid, ttl_seconds=-1)}"),
        # a bearer token in its place
        client.get(f"/v1/sessions/{sid}/events?after={ids[0]}&token="
                   f"{issue_token(secret, user)}"),
        # signed with another secret
        client.get(f"/v1/sessions/{sid}/events?after={ids[0]}&token="
                   f"{issue_stream_token('another-secret-of-enough-bytes-xx', user, sid)}"),
    ]
    assert [r.status_code for r in refused] == [401] * len(refused)
    # One made out for another user (a case variant of this one) is that user's: 403.
    forged = issue_stream_token(secret, user.upper(), sid)
    res = client.get(f"/v1/sessions/{sid}/events?after={ids[0]}&token={forged}")
    assert res.status_code == 403


def test_a_stream_token_in_a_logged_url_is_masked() -> None:
    token = issue_stream_token("s" * 40, "alice", "0" * 32)
    record = logging.LogRecord("backbone.http", logging.INFO, __file__, 1,
                               "GET /v1/sessions/x/events?token=%s", (token,), None)
    line = logs.JsonFormatter().format(record)
    assert token not in line and token.split(".")[2] not in line
