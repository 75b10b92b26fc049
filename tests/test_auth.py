"""Bearer tokens: a token must name its user (`sub`) and say when it ends (`exp`)."""

from __future__ import annotations

import time

import jwt
import pytest
from starlette.testclient import TestClient

from app.auth import issue_token, verify_token
from app.errors import Unauthorized
from app.settings import Settings

SECRET = "a-test-secret-of-sufficient-length-0123456789"


def test_a_token_without_exp_is_refused_though_correctly_signed() -> None:
    forever = jwt.encode({"sub": "alice", "iat": int(time.time())}, SECRET, "HS256")
    with pytest.raises(Unauthorized, match="exp"):
        verify_token(SECRET, forever)


def test_a_token_without_sub_is_refused() -> None:
    nobody = jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256")
    with pytest.raises(Unauthorized, match="sub"):
        verify_token(SECRET, nobody)


def test_an_issued_token_carries_exp_and_is_accepted() -> None:
    token = issue_token(SECRET, "alice", ttl_seconds=60)
    assert "exp" in jwt.decode(token, SECRET, algorithms=["HS256"])
    assert verify_token(SECRET, token) == "alice"


def test_the_api_answers_401_to_a_token_without_exp(client: TestClient, settings: Settings) -> None:
    forever = jwt.encode({"sub": "alice"}, settings.auth_secret or "", "HS256")
    res = client.post("/v1/sessions", headers={"Authorization": f"Bearer {forever}"})
    assert res.status_code == 401
    assert res.json()["error"]["code"] == "unauthorized"
    listed = client.get("/v1/sessions", headers={"Authorization": f"Bearer {forever}"})
    assert listed.status_code == 401
