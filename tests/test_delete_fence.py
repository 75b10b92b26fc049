"""A delete that wins: once `DELETE /v1/sessions/{sid}` answered 204, nothing of the
session comes back: not the turn still streaming, not the sweep, not a restore,
not memory extraction. Real servers, real turns."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
import redis
from live import app_process
from sse import frames
from waits import wait_until

from app.embeddings import shared_embedder
from app.errors import NotFound
from app.memory import RuleExtractor
from app.sessions import history_db, messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys, scripts
from tests.conftest import BOTH_TOPOLOGIES
from workers import jobs
from workers.memory_job import run_extraction

Headers = Callable[[str], dict[str, str]]
pytestmark = [pytest.mark.anyio, BOTH_TOPOLOGIES]
# How many live deletes the loop tries; raise it to measure (docs/sessions.md: the figure).
ATTEMPTS = int(os.environ.get("DELETE_FENCE_ATTEMPTS", "8"))
# Frames read before the DELETE: none yet, after the tool result, mid-answer, after the end.
DELETE_AFTER = (0, 2, 6, 10_000)


def _traces(sr: redis.Redis, pg: psycopg.Connection[Any], sid: str) -> dict[str, Any]:
    """Everything of a session either store still holds (empty when it is gone)."""
    found: dict[str, Any] = {}
    live = [k for k in keys.session_keys(sid) if sr.exists(k)]
    live += [k.decode() for k in sr.scan_iter(match=f"events:{{{sid}}}:*")]
    if live:
        found["redis"] = live
    if sr.zscore(keys.unpersisted(sid), sid) is not None:
        found["unpersisted"] = True
    for table, column in (("sessions", "id"), ("messages", "session_id")):
        row = pg.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (sid,)).fetchone()
        if row != (0,):
            found[table] = row
    return found


def _turn_then_delete(base: str, sid: str, h: dict[str, str], after: int) -> list[str]:
    """POST a question, DELETE the session after `after` frames, read the stream out."""
    lines: list[str] = []
    deleted = False
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
        json={"content": "How does Redis persist data with AOF?"},
    ) as res:
        assert res.status_code == 200
        for line in res.iter_lines():
            lines.append(line)
            if not deleted and line == "" and len(frames(lines)) >= after:
                assert httpx.delete(f"{base}/v1/sessions/{sid}", headers=h).status_code == 204
                deleted = True
    if not deleted:
        assert httpx.delete(f"{base}/v1/sessions/{sid}", headers=h).status_code == 204
    return [f.event for f in frames([*lines, ""])]


def test_a_session_deleted_during_its_turn_never_comes_back(
    stores_env: Settings, token_for: Headers, user: str, r: redis.Redis, sr: redis.Redis,
    pg: psycopg.Connection[Any],
) -> None:
    h = token_for(user)
    came_back: list[tuple[str, dict[str, Any]]] = []
    endings: dict[str, int] = {}
    with app_process(stores_env, OFFLINE_TOKEN_DELAY_MS="30",
                     RATE_LIMIT_MESSAGES="100000") as (base, _):
        for attempt in range(ATTEMPTS):
            sid = httpx.post(f"{base}/v1/sessions", headers=h).json()["id"]
            events = _turn_then_delete(base, sid, h, DELETE_AFTER[attempt % len(DELETE_AFTER)])
            last = events[-1] if events else "none"
            if last == "error":
                endings["session_deleted"] = endings.get("session_deleted", 0) + 1
            else:
                endings[last] = endings.get(last, 0) + 1
            # The turn's task ends after its stream: its persist is refused, and it
            # drops its own event stream last.
            wait_until(lambda sid=sid: not list(sr.scan_iter(match=f"events:{{{sid}}}:*")),
                       "the turn to finish")
            asyncio.run(jobs._sweep(stores_env, 0.0))
            traces = _traces(sr, pg, sid)
            if httpx.get(f"{base}/v1/sessions/{sid}", headers=h).status_code != 404:
                traces["get"] = "not 404"
            listed = httpx.get(f"{base}/v1/sessions", headers=h).json()["sessions"]
            if sid in {s["id"] for s in listed}:
                traces["listed"] = True
            if traces:
                came_back.append((sid, traces))
            extracted = run_extraction(r, pg, sid, stores_env, RuleExtractor(),
                                       shared_embedder(stores_env.embedding_model),
                                       sessions=sr)
            assert extracted == {"skipped": "deleted"}
    print(f"\ndeleted sessions that come back: {len(came_back)} of {ATTEMPTS}; endings {endings}")
    assert came_back == []
    assert endings.get("session_deleted", 0) > 0  # some deletes did land mid-turn


def test_a_turn_whose_session_is_deleted_ends_with_a_session_deleted_error(
    stores_env: Settings, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    with app_process(stores_env, OFFLINE_TOKEN_DELAY_MS="40") as (base, _):
        sid = httpx.post(f"{base}/v1/sessions", headers=h).json()["id"]
        lines: list[str] = []
        with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
            json={"content": "How does Redis persist data with AOF?"},
        ) as res:
            for line in res.iter_lines():
                lines.append(line)
                if [f.event for f in frames(lines)].count("message.delta") == 2 and line == "":
                    httpx.delete(f"{base}/v1/sessions/{sid}", headers=h)
        got = frames([*lines, ""])
    assert got[-1].event == "error" and got[-1].data["code"] == "session_deleted"
    # The fence stops the stream within event_log.FENCE_CHECK_SECONDS, not at the answer's end.
    assert "message.done" not in [f.event for f in got]



def _msg(sid: str, seq: int, text: str) -> messages.Message:
    return messages.build(sid, seq, "user", text)


@pytest.mark.anyio
async def test_a_restore_that_read_postgresql_before_the_delete_writes_nothing(
    session_store: Sessions, user: str, sr: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    sid = await session_store.create(user)
    await session_store.persist(sid, user, await session_store.append(
        sid, user, [_msg(sid, 0, "hello")], 0))
    sr.delete(keys.session(sid), keys.session_user(sid))  # evicted: the next load restores
    async with session_store.pg.connection() as conn:  # the restore's read...
        text = await history_db.history_json(conn, sid)
    await session_store.delete(sid, user)  # ...then the delete...
    wrote = await scripts.arun(session_store.redis,  # ...then the restore's write
                               scripts.restore_session(sid, user, text, 60))
    assert wrote == -1
    assert _traces(sr, pg, sid) == {}
    with pytest.raises(NotFound):
        await session_store.load(sid, user)


@pytest.mark.anyio
async def test_restores_racing_a_delete_leave_nothing(
    session_store: Sessions, user: str, sr: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    for _ in range(10):
        sid = await session_store.create(user)
        await session_store.persist(sid, user, await session_store.append(
            sid, user, [_msg(sid, 0, "hello")], 0))
        sr.delete(keys.session(sid), keys.session_user(sid))
        results = await asyncio.gather(
            *(session_store.load(sid, user) for _ in range(6)),
            session_store.delete(sid, user),
            *(session_store.load(sid, user) for _ in range(6)),
            return_exceptions=True,
        )
        errors = [x for x in results if isinstance(x, BaseException)]
        assert all(isinstance(x, NotFound) for x in errors), errors
        assert _traces(sr, pg, sid) == {}


@pytest.mark.anyio
async def test_a_sweep_that_read_redis_before_the_delete_persists_nothing(
    session_store: Sessions, user: str, sr: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    sid = await session_store.create(user)
    await session_store.append(sid, user, [_msg(sid, 0, "never persisted")], 0)
    owner = sr.get(keys.session_user(sid))  # the sweep's read...
    history = sr.execute_command("JSON.GET", keys.session(sid), ".")  # type: ignore[no-untyped-call]
    await session_store.delete(sid, user)  # ...the delete...
    async with session_store.pg.connection() as conn:  # ...the sweep's persist
        outcome = await jobs._persist_one(conn, sid, 0.0, owner, history, 0)
        assert outcome == ("deleted", 0)
        with pytest.raises(NotFound):
            await history_db.persist(conn, sid, user, json.loads(history))
    assert _traces(sr, pg, sid) == {}


@pytest.mark.anyio
async def test_sweeps_racing_deletes_leave_nothing_of_the_deleted_sessions(
    stores_env: Settings, session_store: Sessions, user: str, sr: redis.Redis,
    pg: psycopg.Connection[Any],
) -> None:
    sids = [await session_store.create(user) for _ in range(40)]
    for sid in sids:
        await session_store.append(sid, user, [_msg(sid, 0, "unpersisted")], 0)
    doomed = sids[::2]
    sweep = asyncio.create_task(jobs._sweep(stores_env, 0.0, batch_size=4))
    await asyncio.gather(*(session_store.delete(sid, user) for sid in doomed))
    counts = await sweep
    await jobs._sweep(stores_env, 0.0)
    assert counts["failed"] == 0
    assert [sid for sid in doomed if _traces(sr, pg, sid)] == []
    for sid in sids[1::2]:  # the others are persisted whole
        assert (await session_store.full_history(sid, user)).messages[0]["content"] == (
            "unpersisted")
        assert pg.execute("SELECT count(*) FROM messages WHERE session_id = %s",
                          (sid,)).fetchone() == (1,)


@pytest.mark.anyio
async def test_an_append_to_a_deleted_session_is_refused_and_leaves_no_mark(
    session_store: Sessions, user: str, sr: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    sid = await session_store.create(user)
    await session_store.delete(sid, user)
    with pytest.raises(NotFound) as info:
        await session_store.append(sid, user, [_msg(sid, 0, "too late")], 0)
    assert info.value.code == "session_deleted"
    assert _traces(sr, pg, sid) == {}
    assert sr.exists(keys.session_deleted(sid))
