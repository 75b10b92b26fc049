"""Memory end to end: a turn marks its session due, a worker mines it, a later turn recalls it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import psycopg
import redis
from fakes import FakeOpenAI, text_reply
from rq import Queue, SimpleWorker
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.api import create_app
from app.memory.queue import dispatch_all
from app.settings import Settings
from app.stores import keys

Headers = Callable[[str], dict[str, str]]


def _say(c: TestClient, sid: str, h: dict[str, str], text: str) -> None:
    with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                  json={"content": text}) as res:
        assert res.status_code == 200
        assert frames(res.iter_lines())[-1].event == "message.done"


@contextlib.contextmanager
def noting_app(stores_env: Settings) -> Iterator[tuple[TestClient, FakeOpenAI]]:
    """The app on a stand-in model that answers "Noted." and keeps every request."""
    fake = FakeOpenAI(responder=lambda body: text_reply("Noted."))
    with fake.serve() as base:
        s = dataclasses.replace(stores_env, llm_base_url=base + "/v1")
        with TestClient(create_app(s)) as c:
            yield c, fake


def test_a_fact_told_in_one_session_is_recalled_into_the_context_of_another(
    stores_env: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    with noting_app(stores_env) as (c, fake):
        h = token_for(user)
        first = c.post("/v1/sessions", headers=h).json()["id"]
        _say(c, first, h, "I'm allergic to peanuts, please keep that in mind.")

        queue = Queue("memory", connection=r)
        # The turn's task marks the session due after persisting, just after the
        # stream ends; a worker's dispatcher queues its job.
        wait_until(lambda: r.zscore("memory-due", first) is not None,
                   "the turn to mark its session due for extraction")
        assert dispatch_all(r) >= 1
        assert queue.count >= 1
        # The worker's environment names no LLM: the offline rule extractor mines the turn.
        SimpleWorker([queue], connection=r).work(burst=True)
        memories = c.get("/v1/memories", headers=h).json()["memories"]
        assert [m["content"] for m in memories] == ["is allergic to peanuts"]

        second = c.post("/v1/sessions", headers=h).json()["id"]
        _say(c, second, h, "Can you suggest a snack with peanuts?")
    system = fake.requests[-1]["messages"][0]["content"]
    assert "allergic to peanuts" in system
    # The recall marked it used, written in a batch at the latest as the app stopped
    # (MEMORY_MAX_PER_USER evicts the least recently used first).
    with psycopg.connect(stores_env.database_url or "") as pg:
        row = pg.execute("SELECT used_at > created_at FROM memories WHERE user_id = %s",
                         (user,)).fetchone()
    assert row == (True,)


def test_the_rolling_summary_reaches_the_model_for_a_live_and_for_a_restored_session(
    stores_env: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    with noting_app(stores_env) as (c, fake):
        h = token_for(user)
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        _say(c, sid, h, "Hello there.")
        # As the extraction job leaves it: the summary read with the history.
        r.set(keys.memory_summary(sid), "The user is planning a trip to Kyoto.")
        _say(c, sid, h, "Which month would be best?")
        live = fake.requests[-1]["messages"][0]["content"]
        # Evicted from Redis (the summary outlives it): restored from PostgreSQL.
        r.delete(keys.session(sid), keys.session_user(sid))
        _say(c, sid, h, "And where should I stay?")
        restored = fake.requests[-1]["messages"][0]["content"]
        r.delete(keys.memory_summary(sid))
        _say(c, sid, h, "Thanks.")
        none = fake.requests[-1]["messages"][0]["content"]
    said = "Summary of the earlier conversation:\nThe user is planning a trip to Kyoto."
    for system in (live, restored):
        assert said in system
    assert "Kyoto" not in none
