"""The event writer against a real Redis: a failed write fails one flush, not the turn."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sse import frames
from starlette.testclient import TestClient

from app.api import create_app
from app.chat import event_log
from app.chat.event_log import EventLog
from app.errors import NotFound
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_session_redis_client
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = [pytest.mark.anyio, BOTH_TOPOLOGIES]
Headers = Callable[[str], dict[str, str]]


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(dataclasses.replace(settings, offline_token_delay_ms=0))) as c:
        yield c


async def test_a_failed_event_write_fails_only_its_flush_and_later_events_are_written(
    settings: Settings, sr: redis.Redis
) -> None:
    sid = keys.new_session_id()
    client = async_session_redis_client(settings)
    try:
        log = EventLog(client, sid, 0)
        sr.set(log.key, "not a stream")  # XADD answers WRONGTYPE: this batch fails
        log.emit("message.delta", {"text": "lost"})
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            await log.flush()
        sr.delete(log.key)
        log.emit("message.delta", {"text": "kept"})
        log.emit("message.done", {"message": {}})
        await log.flush()  # tried afresh: no error left over from the failed batch
        entries: Any = sr.xrange(log.key)
        stored = [f[b"event"].decode() for _, f in entries]
        assert stored == ["message.delta", "message.done"]
        await log.flush()  # nothing pending, nothing failed since: returns
    finally:
        sr.delete(keys.events(sid, 0))
        await client.aclose()


async def test_a_replayed_event_is_the_same_frame_the_live_client_got(
    settings: Settings, sr: redis.Redis
) -> None:
    sid = keys.new_session_id()
    client = async_session_redis_client(settings)
    # Non-ASCII, line breaks, and an integer orjson refuses (past 64 bits).
    datas: list[dict[str, Any]] = [
        {"text": "é\r\n\u2028 «x»"}, {"arguments": {"n": 2**70}}, {"message": {}}]
    try:
        log = EventLog(client, sid, 3)
        live = [log.emit(kind, data) for kind, data in
                zip(("message.delta", "tool.call", "message.done"), datas, strict=True)]
        await log.flush()
        replayed = [e async for e in event_log.replay(client, sid, 3, "0-0")]
    finally:
        sr.delete(keys.events(sid, 3))
        await client.aclose()
    assert [e.sse() for e in replayed] == [e.sse() for e in live]
    got = frames(b"".join(e.sse() for e in live).decode().split("\n"))
    assert [(f.id, f.event, f.data) for f in got] == [
        (e.id, e.event, d) for e, d in zip(live, datas, strict=True)]


async def test_a_replay_of_a_running_turn_waits_for_its_first_event_and_a_gone_one_is_404(
    settings: Settings, sr: redis.Redis
) -> None:
    sid = keys.new_session_id()
    client = async_session_redis_client(settings)
    try:
        with pytest.raises(NotFound):  # nothing logged, nothing said to be running: gone
            await anext(event_log.replay(client, sid, 5, "0-0"))
        replayed = event_log.replay(client, sid, 5, "0-0", starting=True)
        first = asyncio.ensure_future(anext(replayed))
        await asyncio.sleep(0.3)  # the turn has not logged its first event yet
        assert not first.done()
        log = EventLog(client, sid, 5)
        live = [log.emit("message.delta", {"text": "late"}), log.emit("message.done", {})]
        await log.flush()
        got = [await first, *[e async for e in replayed]]
    finally:
        sr.delete(keys.events(sid, 5))
        await client.aclose()
    assert [e.sse() for e in got] == [e.sse() for e in live]


def test_a_turn_whose_event_writes_fail_still_ends_with_message_done_matching_the_history(
    app_client: TestClient, sr: redis.Redis, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    sid = app_client.post("/v1/sessions", headers=h).json()["id"]
    sr.set(keys.events(sid, 0), "not a stream", ex=60)  # every event write of turn 0 fails
    res = app_client.post(f"/v1/sessions/{sid}/messages", headers=h,
                          json={"content": "What is Redis?"})
    got = frames(res.text.splitlines())
    assert got[-1].event == "message.done", [f.event for f in got]
    history = app_client.get(f"/v1/sessions/{sid}", headers=h).json()["messages"]
    assert history[-1]["role"] == "assistant"
    assert history[-1]["hash"] == got[-1].data["message"]["hash"]
    sr.delete(keys.events(sid, 0))
