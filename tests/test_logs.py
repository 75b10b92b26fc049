"""Structured logs: one JSON object per record, with ids, and never a secret."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator

import pytest
from sse import frames
from starlette.testclient import TestClient

from app.api import create_app
from app.auth import issue_token
from app.ops.logs import JsonFormatter
from app.settings import Settings


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines into a buffer, at DEBUG: everything."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_a_real_turn_logs_json_lines_with_ids_and_never_the_token_or_the_secret(
    settings: Settings, user: str, json_log: io.StringIO
) -> None:
    token = issue_token(settings.auth_secret or "", user)
    h = {"Authorization": f"Bearer {token}", "X-Request-ID": "req-probe-1"}
    fast = dataclasses.replace(settings, offline_token_delay_ms=0)
    with TestClient(create_app(fast)) as client:
        sid = client.post("/v1/sessions", headers=h).json()["id"]
        with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                           json={"content": "What does AOF everysec lose?"}) as res:
            assert res.headers["x-request-id"] == "req-probe-1"
            assert frames(res.iter_lines())[-1].event == "message.done"
        bad = client.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}x"})
        assert bad.status_code == 401
        # Whatever code logs a secret by mistake, the output masks it.
        logging.getLogger("backbone.probe").warning("header was Bearer %s, secret %s",
                                                    token, settings.auth_secret)
    text = json_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    access = [x for x in lines if x["logger"] == "backbone.http"
              and x["msg"].startswith(f"POST /v1/sessions/{sid}/messages 200")]
    assert access and access[0]["request_id"] == "req-probe-1" and access[0]["session"] == sid
    assert token not in text and token.split(".")[2] not in text
    assert (settings.auth_secret or "-") not in text
    assert "Bearer [redacted]" in text


def test_turn_lines_carry_the_turn_number() -> None:
    from app.ops import logs

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    probe = logging.getLogger("backbone.turn-probe")
    probe.addHandler(handler)
    token = logs.TURN.set(3)
    try:
        probe.warning("x")
    finally:
        logs.TURN.reset(token)
        probe.removeHandler(handler)
    assert json.loads(out.getvalue())["turn"] == 3
