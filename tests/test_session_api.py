"""`/v1/sessions` over HTTP: auth, ownership, validation, and the JSON error body."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import jwt
import pytest
from starlette.testclient import TestClient

from app.api import create_app
from app.settings import Settings
from app.stores import keys
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = BOTH_TOPOLOGIES
Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def _endpoints(sid: str) -> list[tuple[str, str]]:
    return [("POST", "/v1/sessions"), ("GET", "/v1/sessions"),
            ("GET", f"/v1/sessions/{sid}"), ("DELETE", f"/v1/sessions/{sid}")]


def _error(res: object) -> dict[str, str]:
    body = res.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return dict(body["error"])


def test_every_endpoint_refuses_a_missing_or_invalid_token_with_401(
    client: TestClient, settings: Settings
) -> None:
    sid = keys.new_session_id()
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 10},
                         settings.auth_secret or "", "HS256")
    forged = jwt.encode({"sub": "alice"}, "another-secret-of-sufficient-length!!", "HS256")
    for headers in ({}, {"Authorization": "Bearer nonsense"},
                    {"Authorization": f"Bearer {expired}"}, {"Authorization": f"Bearer {forged}"},
                    {"Authorization": "Basic YWxpY2U6eA=="}):
        for method, path in _endpoints(sid):
            res = client.request(method, path, headers=headers)
            assert res.status_code == 401, (method, path, headers)
            assert _error(res)["code"] == "unauthorized"


def test_another_users_token_gets_403_on_every_session_endpoint_and_changes_nothing(
    client: TestClient, token_for: Headers, user: str
) -> None:
    sid = client.post("/v1/sessions", headers=token_for(user)).json()["id"]
    for method, path in _endpoints(sid)[2:]:
        res = client.request(method, path, headers=token_for("mallory"))
        assert res.status_code == 403, (method, path)
        assert _error(res)["code"] == "forbidden"
    assert client.get(f"/v1/sessions/{sid}", headers=token_for(user)).status_code == 200
    listed = client.get("/v1/sessions", headers=token_for("mallory")).json()["sessions"]
    assert sid not in {s["id"] for s in listed}


@pytest.mark.parametrize("bad", ["*", "abc", "0" * 31 + "}", "%7Bx%7D", "0" * 31 + "%0A",
                                 "A" * 32, "0" * 33])
def test_a_session_id_not_in_the_server_format_is_400(
    client: TestClient, token_for: Headers, user: str, bad: str
) -> None:
    for method in ("GET", "DELETE"):
        res = client.request(method, f"/v1/sessions/{bad}", headers=token_for(user))
        assert res.status_code == 400, (method, bad)
        assert _error(res)["code"] == "invalid_session_id"


def test_an_unknown_session_is_404(client: TestClient, token_for: Headers, user: str) -> None:
    for method in ("GET", "DELETE"):
        res = client.request(method, f"/v1/sessions/{keys.new_session_id()}",
                             headers=token_for(user))
        assert res.status_code == 404
        assert _error(res)["code"] == "not_found"


def test_create_list_read_delete_round_trip_newest_first(
    client: TestClient, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    first = client.post("/v1/sessions", headers=h)
    assert first.status_code == 201
    second = client.post("/v1/sessions", headers=h)
    ids = [s["id"] for s in client.get("/v1/sessions", headers=h).json()["sessions"]]
    assert ids == [second.json()["id"], first.json()["id"]]

    got = client.get(f"/v1/sessions/{first.json()['id']}", headers=h).json()
    assert got == {"id": first.json()["id"], "user": user, "messages": []}

    assert client.delete(f"/v1/sessions/{first.json()['id']}", headers=h).status_code == 204
    assert client.get(f"/v1/sessions/{first.json()['id']}", headers=h).status_code == 404
    ids = [s["id"] for s in client.get("/v1/sessions", headers=h).json()["sessions"]]
    assert ids == [second.json()["id"]]


def test_a_token_printed_by_the_cli_is_accepted(
    client: TestClient, settings: Settings
) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "token", "--user", "cli-user"],
        capture_output=True, text=True, timeout=60,
        env={"AUTH_SECRET": settings.auth_secret or "", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    headers = {"Authorization": f"Bearer {res.stdout.strip()}"}
    assert client.post("/v1/sessions", headers=headers).status_code == 201
