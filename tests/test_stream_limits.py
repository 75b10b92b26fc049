"""Open event streams are bounded per user and per node (issue #23, item 1).

Before: one user opened 600 resumers on her own turn, each parked in a blocking
XREAD on a connection of the app's one pool, and another user's plain requests
waited 10 s for a connection and got 503. Now a user holds at most
MAX_STREAMS_PER_USER streams (the rest: 429 too_many_streams, at once), and the
admitted ones read on a pool of their own.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import httpx
import pytest
import redis
import redis.asyncio as aredis
from live import app_process
from prometheus_client import REGISTRY
from sse import frames
from sse_starlette import EventSourceResponse
from waits import wait_until

from app.chat.stream_slots import SlotStream, StreamSlots
from app.errors import TooManyStreams
from app.settings import Settings
from app.stack.embedded import free_port
from app.stores import keys, scripts
from app.stores.clients import POOL_WAIT_SECONDS

Headers = Callable[[str], dict[str, str]]
FLOOD = 600


async def _first_event(client: httpx.AsyncClient, base: str, sid: str, h: dict[str, str]) -> str:
    """POST a message, read its first event's id, drop the connection."""
    lines: list[str] = []
    async with client.stream("POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
                             json={"content": "Tell me a long story about streams."}) as res:
        assert res.status_code == 200
        async for line in res.aiter_lines():
            lines.append(line)
            if line == "" and frames(lines):
                break
    first = frames(lines)[0]
    assert first.id is not None
    return first.id


async def _flood(base: str, sid: str, h: dict[str, str], after: str,
                 other: dict[str, str], other_sid: str,
                 ) -> tuple[list[int], list[tuple[int, float]]]:
    """FLOOD resumers of one turn, held open, while another user reads her session."""
    limits = httpx.Limits(max_connections=FLOOD + 50, max_keepalive_connections=0)
    opened: list[int] = []
    held = asyncio.Event()
    release = asyncio.Event()

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def resume() -> None:
            async with client.stream("GET", f"{base}/v1/sessions/{sid}/events",
                                     headers={**h, "Last-Event-ID": after}) as res:
                opened.append(res.status_code)
                if len(opened) == FLOOD:
                    held.set()
                if res.status_code == 200:
                    await release.wait()  # hold the stream open, idle in XREAD

        flood = [asyncio.create_task(resume()) for _ in range(FLOOD)]
        await asyncio.wait_for(held.wait(), 60)
        served: list[tuple[int, float]] = []
        async with httpx.AsyncClient(timeout=30) as own:
            for _ in range(20):
                started = time.perf_counter()
                res = await own.get(f"{base}/v1/sessions/{other_sid}", headers=other)
                served.append((res.status_code, time.perf_counter() - started))
        release.set()
        await asyncio.gather(*flood)
    return opened, served


def test_600_resumers_of_one_user_admit_8_and_another_users_requests_stay_served(
    settings: Settings, token_for: Headers, user: str, sr: redis.Redis
) -> None:
    mallory, alice = token_for(user), token_for(user + "-other")
    # A slow turn (a token every 3 s), so the resumers wait on it, idle.
    with app_process(settings, OFFLINE_TOKEN_DELAY_MS="3000") as (base, _):
        sid = httpx.post(f"{base}/v1/sessions", headers=mallory).json()["id"]
        other_sid = httpx.post(f"{base}/v1/sessions", headers=alice).json()["id"]

        async def scenario() -> tuple[str, list[int], list[tuple[int, float]]]:
            async with httpx.AsyncClient(timeout=60) as client:
                after = await _first_event(client, base, sid, mallory)
            # The dropped POST gives its slot back.
            wait_until(lambda: sr.zcard(keys.streams(user)) == 0, "the POST's slot released")
            return after, *await _flood(base, sid, mallory, after, alice, other_sid)

        after, opened, served = asyncio.run(scenario())
        assert opened.count(200) == 8
        assert opened.count(429) == FLOOD - 8
        assert [status for status, _ in served] == [200] * len(served)
        # None of them waited for a pool connection (main: 10 s, then 503).
        assert max(seconds for _, seconds in served) < POOL_WAIT_SECONDS / 2
        # Every resumer is gone: its slot is given back.
        wait_until(lambda: sr.zcard(keys.streams(user)) == 0, "the resumers' slots released")
        with httpx.Client(timeout=60) as client, client.stream(
            "GET", f"{base}/v1/sessions/{sid}/events",
            headers={**mallory, "Last-Event-ID": after},
        ) as res:
            assert res.status_code == 200  # admitted again


def test_a_refused_stream_says_too_many_streams_with_retry_after(
    settings: Settings, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    with app_process(settings, MAX_STREAMS_PER_USER="1", OFFLINE_TOKEN_DELAY_MS="300") as (
        base, _,
    ), httpx.Client(timeout=60) as client:
        sid = client.post(f"{base}/v1/sessions", headers=h).json()["id"]
        with client.stream("POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
                           json={"content": "a long one"}) as live:
            assert live.status_code == 200
            second = client.post(f"{base}/v1/sessions/{sid}/messages", headers=h,
                                 json={"content": "and another"})
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "too_many_streams"
            assert int(second.headers["Retry-After"]) >= 1
            scraped = client.get(f"{base}/metrics").text
        assert 'backbone_streams_refused_total{limit="user"} 1.0' in scraped
        assert "backbone_streams_open 1.0" in scraped


def _refused(limit: str) -> float:
    return REGISTRY.get_sample_value("backbone_streams_refused_total", {"limit": limit}) or 0.0


async def _slots(settings: Settings, **kw: int) -> StreamSlots:
    url = settings.session_redis_url or settings.redis_url or ""
    client = aredis.RedisCluster.from_url(url) if settings.session_redis_cluster \
        else aredis.Redis.from_url(url)
    return StreamSlots(client, client, per_user=kw.get("per_user", 8),  # type: ignore[arg-type]
                       per_node=kw.get("per_node", 256))


@pytest.mark.anyio
async def test_user_ids_differing_only_by_case_hold_separate_slots(
    settings: Settings, user: str, sr: redis.Redis
) -> None:
    slots = await _slots(settings, per_user=2)
    lower, upper = user + "-alice", user + "-Alice"
    held = [await slots.acquire(lower), await slots.acquire(lower)]
    with pytest.raises(TooManyStreams):
        await slots.acquire(lower)
    other = await slots.acquire(upper)  # another user, though equal but for case
    assert other.user == upper
    for slot in [*held, other]:
        slot.release()
    await slots.aclose()  # waits for the releases
    assert sr.zcard(keys.streams(lower)) == 0
    assert sr.zcard(keys.streams(upper)) == 0


@pytest.mark.anyio
async def test_the_node_limit_refuses_before_any_redis_work(settings: Settings, user: str) -> None:
    slots = await _slots(settings, per_node=2)
    first = await slots.acquire(user)
    second = await slots.acquire(user + "-b")
    real, slots.redis = slots.redis, aredis.Redis(port=free_port())  # nothing listens
    refused_before = _refused("node")
    with pytest.raises(TooManyStreams) as refused:
        await slots.acquire(user + "-c")
    assert "server" in refused.value.message
    assert _refused("node") == refused_before + 1
    await slots.redis.aclose()
    slots.redis = real
    second.release()
    first.release()
    assert slots.open == 0
    await slots.aclose()


@pytest.mark.anyio
async def test_a_stream_refused_while_opening_gives_its_slot_back(
    settings: Settings, user: str
) -> None:
    slots = await _slots(settings, per_node=4)
    with pytest.raises(LookupError):
        async with slots.opening(user):
            assert slots.open == 1
            raise LookupError("say, the session is not the caller's")
    assert slots.open == 0
    async with slots.opening(user) as kept:  # opened: its response holds it on
        pass
    assert slots.open == 1 and not kept.released
    kept.release()
    await slots.aclose()


@pytest.mark.anyio
async def test_slots_left_by_a_crashed_node_lapse_with_their_lease(
    settings: Settings, user: str, sr: redis.Redis
) -> None:
    slots = await _slots(settings, per_user=1)
    now = int(time.time() * 1000)
    # A node that died holding the user's one slot, leased 60 s ago for 60 s.
    ok, _ = scripts.run(sr, scripts.acquire_stream_slot(user, "dead", now - 61_000, 60_000, 1))
    assert ok == 1
    slot = await slots.acquire(user)  # admitted: the dead node's lease ran out
    assert sr.zscore(keys.streams(user), "dead") is None
    slot.release()
    await slots.aclose()


@pytest.mark.anyio
async def test_a_held_slot_is_renewed_and_keeps_the_user_within_the_limit(
    settings: Settings, user: str, sr: redis.Redis
) -> None:
    slots = await _slots(settings, per_user=1)
    slot = await slots.acquire(user)
    first = sr.zscore(keys.streams(user), slot.id)
    await asyncio.sleep(0.01)
    await slots.renew()
    renewed = sr.zscore(keys.streams(user), slot.id)
    assert first is not None and renewed is not None and renewed > first
    with pytest.raises(TooManyStreams):
        await slots.acquire(user)
    slot.release()
    await slots.aclose()
    assert sr.zcard(keys.streams(user)) == 0


def test_slot_streams_replace_the_send_step_sse_starlette_takes_for_every_frame() -> None:
    """SlotStream sends a frame without sse-starlette's per-send cancel scope (there is
    no send timeout) by overriding `_send_with_timeout`. Were the library to stop
    sending frames through it, the override would do nothing and the cost come back;
    were it to stop reading `_send_interrupted`, a failed send would get a closing frame."""
    assert "_send_with_timeout" in vars(SlotStream)
    assert "self._send_with_timeout(" in inspect.getsource(EventSourceResponse._stream_response)
    assert "self._send_interrupted" in inspect.getsource(EventSourceResponse.__call__)
