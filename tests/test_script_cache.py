"""An emptied script cache (SCRIPT FLUSH, a restart, a failover) costs one EVAL, never an
error: on one Redis and on the session-plane cluster, through the app's two batched
script paths (`scripts.arun_after`, `replicated.arun_waited`) and over HTTP. Start-up
(`prepare`) loads the scripts into every primary of a cluster session plane too.

The regression (issue #23, item 4): `arun_waited` unpacked the replies of the commands
run before the script into its own `before` argument, so its NOSCRIPT retry sent those
integer replies as commands: a TypeError, a 500 on every message with WAIT configured
until some process loaded the scripts again.
"""

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
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stores import keys, replicated, scripts
from app.stores.clients import async_session_redis_client
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = BOTH_TOPOLOGIES

Headers = Callable[[str], dict[str, str]]


@pytest.fixture(scope="module")
def waiting(settings: Settings) -> Settings:
    """WAIT for one replica on either topology (the cluster's default; on one node,
    where nothing can acknowledge, it times out fast and the append still answers)."""
    return dataclasses.replace(settings, session_redis_wait_replicas=1,
                               session_redis_wait_timeout_ms=50, offline_token_delay_ms=0)


def flush_scripts(sr: redis.Redis) -> None:
    """SCRIPT FLUSH on the session plane: every primary of a cluster."""
    sr.script_flush()
    sid = keys.new_session_id()
    assert sr.script_exists(scripts.create_session(sid, "u", 1).script.sha) == [False]


def test_a_message_after_a_script_flush_is_answered_with_wait_configured(
    waiting: Settings, sr: redis.Redis, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    # As an HTTP client sees it: a server error is a 500, not an exception in the test.
    with TestClient(create_app(waiting), raise_server_exceptions=False) as client:
        sid = client.post("/v1/sessions", headers=h).json()["id"]
        for n in range(2):  # the second after another flush: each one pays one EVAL
            flush_scripts(sr)
            with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                               json={"content": f"hello number {n}"}) as res:
                assert res.status_code == 200, res.read()
                assert frames(res.iter_lines())[-1].event == "message.done"
        history = client.get(f"/v1/sessions/{sid}", headers=h).json()["messages"]
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users == ["hello number 0", "hello number 1"]


def cached_where(sr: redis.Redis, sid: str) -> bool:
    """Whether the node serving the session's slot holds the append script."""
    sha = scripts.load_all()["append_messages"].sha
    if isinstance(sr, redis.RedisCluster):
        node = sr.get_node_from_key(keys.session(sid))
        found = sr.execute_command("SCRIPT EXISTS", sha, target_nodes=node)
    else:
        found = sr.script_exists(sha)
    return bool(found == [True] or found == [1])


@pytest.fixture
def sid(sr: redis.Redis, user: str) -> Iterator[str]:
    """A session in Redis only (the scripts under test never touch PostgreSQL)."""
    sid = keys.new_session_id()
    scripts.run(sr, scripts.create_session(sid, user, 600))
    yield sid
    sr.delete(*keys.session_keys(sid))


def _append(sid: str, user: str, text: str) -> scripts.Call[tuple[int, int]]:
    from app.sessions.messages import build, canonical_json

    return scripts.append_messages(sid, user, 0, [canonical_json(build(sid, 0, "user", text))],
                                   600)


def _counter(sid: str) -> str:
    """A key in the session's slot, counting how often the command before ran."""
    return f"{keys.session(sid)}:test-counter"


async def _run(settings: Settings, work: Callable[[Any], Any]) -> Any:
    client = async_session_redis_client(settings)
    try:
        return await work(client)
    finally:
        await client.aclose()


def test_arun_after_runs_the_commands_before_once_and_the_script_by_eval_after_a_flush(
    settings: Settings, sr: redis.Redis, sid: str, user: str
) -> None:
    flush_scripts(sr)
    before = [("INCR", _counter(sid))]
    got = asyncio.run(_run(settings, lambda c: scripts.arun_after(
        c, before, _append(sid, user, "after a flush"))))
    assert got == (1, 1)
    assert sr.get(_counter(sid)) == b"1"
    assert cached_where(sr, sid)  # cached again
    sr.delete(_counter(sid))


def test_arun_waited_runs_the_commands_before_once_and_the_script_by_eval_after_a_flush(
    waiting: Settings, sr: redis.Redis, sid: str, user: str
) -> None:
    flush_scripts(sr)
    # On a cluster the commands before are the caller's to send (they may be on
    # another node); on one Redis they go in the same round trip.
    before = [] if waiting.session_redis_cluster else [("INCR", _counter(sid))]
    (code, next_seq), acked = asyncio.run(_run(waiting, lambda c: replicated.arun_waited(
        c, _append(sid, user, "waited after a flush"), 1, 50, before=before)))
    assert (code, next_seq) == (1, 1)
    assert acked == (1 if waiting.session_redis_cluster else 0)  # one node has no replica
    assert sr.get(_counter(sid)) == (None if before == [] else b"1")
    held = sr.execute_command("JSON.GET", keys.session(sid), "$[*].content")
    assert "waited after a flush" in str(held)
    sr.delete(_counter(sid))


def test_start_up_loads_the_scripts_into_every_primary_of_a_cluster_session_plane(
    settings: Settings, sr: redis.Redis
) -> None:
    if not settings.session_redis_cluster:
        pytest.skip("one Redis: REDIS_URL is the session plane, loaded as before")
    flush_scripts(sr)
    assert isinstance(sr, redis.RedisCluster)
    prepare(settings)
    shas = [s.sha for s in scripts.load_all().values()]
    nodes = sr.get_primaries()
    assert len(nodes) == 3
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as c:
            assert c.script_exists(*shas) == [True] * len(shas), node.name

