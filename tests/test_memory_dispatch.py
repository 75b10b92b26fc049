"""A turn marks its session due; a worker's dispatcher queues the extraction job.

The app never talks to rq per turn (one ZADD on `memory-due`); `dispatch_due`
queues one job per due session and clears a mark only if no turn marked the
session again meanwhile, so no turn's delta is dropped and a crash between the
enqueue and the clear costs at most a second look."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.errors import BadRequest
from app.memory import queue
from app.memory.queue import dispatch_all, dispatch_due, enqueue_extraction, job_ids, mark_due
from app.settings import Settings
from app.stores import keys, scripts
from app.stores.clients import async_redis_client

Headers = Callable[[str], dict[str, str]]


def _turn(client: TestClient, h: dict[str, str]) -> str:
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                       json={"content": "I live in Lisbon."}) as res:
        assert res.status_code == 200
        assert frames(res.iter_lines())[-1].event == "message.done"
    return str(sid)


def _jobs_of(q: Queue, sid: str) -> list[str]:
    return [jid for jid in job_ids(sid) if q.fetch_job(jid) is not None]


def test_a_turn_marks_its_session_due_and_the_dispatcher_queues_its_one_job(
    client: TestClient, token_for: Headers, user: str, r: redis.Redis
) -> None:
    q = Queue("memory", connection=r)
    sid = _turn(client, token_for(user))
    wait_until(lambda: r.zscore(keys.MEMORY_DUE, sid) is not None, "the turn's due mark")
    assert _jobs_of(q, sid) == []  # the app queued nothing itself
    assert dispatch_all(r) >= 1
    assert r.zscore(keys.MEMORY_DUE, sid) is None
    assert _jobs_of(q, sid) == [job_ids(sid)[0]]
    assert job_ids(sid)[0] in q.job_ids


def test_a_session_marked_again_while_being_dispatched_keeps_its_mark(
    r: redis.Redis, user: str
) -> None:
    sid = uuid.uuid4().hex
    r.zadd(keys.MEMORY_DUE, {sid: 1000})
    read = r.zscore(keys.MEMORY_DUE, sid)
    assert read == 1000
    r.zadd(keys.MEMORY_DUE, {sid: 2000})  # a second turn ends between the read and the clear
    assert scripts.run(r, scripts.clear_due([(sid, read)])) == 0
    assert r.zscore(keys.MEMORY_DUE, sid) == 2000  # left for the next pass
    assert scripts.run(r, scripts.clear_due([(sid, 2000.0)])) == 1
    assert r.zscore(keys.MEMORY_DUE, sid) is None


def test_a_dispatcher_killed_before_its_clear_leaves_the_mark_and_no_second_job(
    r: redis.Redis, user: str
) -> None:
    q = Queue("memory", connection=r)
    sid = uuid.uuid4().hex
    r.zadd(keys.MEMORY_DUE, {sid: 1})
    assert enqueue_extraction(r, sid)  # the killed pass got this far
    assert r.zscore(keys.MEMORY_DUE, sid) is not None
    dispatch_all(r)  # the next pass, on any worker
    assert r.zscore(keys.MEMORY_DUE, sid) is None
    assert _jobs_of(q, sid) == [job_ids(sid)[0]]
    assert q.job_ids.count(job_ids(sid)[0]) == 1


def test_a_mark_that_is_no_session_id_is_dropped_and_its_batch_still_dispatched(
    r: redis.Redis, user: str
) -> None:
    q = Queue("memory", connection=r)
    sid = uuid.uuid4().hex
    lookalike = "A" + sid[1:].upper()  # a case variant: session ids are lowercase hex
    r.zadd(keys.MEMORY_DUE, {lookalike: 1, sid: 2, "../rq:queue:memory": 3})
    dispatch_all(r)
    assert r.zscore(keys.MEMORY_DUE, lookalike) is None
    assert r.zscore(keys.MEMORY_DUE, "../rq:queue:memory") is None
    assert _jobs_of(q, sid) == [job_ids(sid)[0]]
    assert not any(j.lower() != j for j in q.job_ids if j.startswith("memory-extract-"))


def test_dispatch_takes_the_oldest_first_and_every_batch_until_none_is_due(
    r: redis.Redis, user: str
) -> None:
    q = Queue("memory", connection=r)
    dispatch_all(r)  # what other tests left
    sids = [uuid.uuid4().hex for _ in range(25)]
    r.zadd(keys.MEMORY_DUE, {sid: i for i, sid in enumerate(sids)})
    assert dispatch_due(r, batch=10) == 10
    assert [bool(_jobs_of(q, s)) for s in sids] == [True] * 10 + [False] * 15
    assert dispatch_all(r, batch=10) == 15
    assert r.zcard(keys.MEMORY_DUE) == 0
    assert all(_jobs_of(q, s) for s in sids)


@pytest.mark.anyio
async def test_mark_due_refuses_what_is_not_a_session_id(settings: Settings) -> None:
    client = async_redis_client(settings.redis_url or "")
    try:
        with pytest.raises(BadRequest):
            await mark_due(client, "A" * 32)
    finally:
        await client.aclose()


def test_a_job_rq_cannot_read_back_is_replaced_and_the_rest_of_its_batch_still_queued(
    r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    q = Queue("memory", connection=r)
    broken, fine = uuid.uuid4().hex, uuid.uuid4().hex
    # A job hash rq cannot read back (rq raises, not a RedisError). Raised out of the pass,
    # it would stop the worker's dispatcher thread, and every later session's extraction.
    r.hset(f"rq:job:{job_ids(broken)[0]}", mapping={"status": "failed", "data": "zz",
                                                     "timeout": "abc"})
    with pytest.raises(Exception) as raised:
        q.fetch_job(job_ids(broken)[0])
    assert not isinstance(raised.value, redis.RedisError)
    r.zadd(keys.MEMORY_DUE, {broken: 1, fine: 2})
    with caplog.at_level("ERROR", logger="backbone.memory"):
        dispatch_all(r)
    assert f"could not queue memory extraction for {broken}" in caplog.text
    assert r.zscore(keys.MEMORY_DUE, broken) is None and r.zscore(keys.MEMORY_DUE, fine) is None
    assert _jobs_of(q, fine) == [job_ids(fine)[0]]
    # The unreadable job is gone and the session is queued afresh: it heals, not waits.
    job = q.fetch_job(job_ids(broken)[0])
    assert job is not None and job.func_name == "workers.memory_job.extract_memories"
    assert job.args == (broken,) and job_ids(broken)[0] in q.job_ids


def _running(q: Queue, jid: str) -> None:
    """As if a worker had picked the job up and were still running it."""
    job = q.fetch_job(jid)
    assert job is not None
    q.remove(job)
    job.set_status(JobStatus.STARTED)


def test_a_session_whose_two_jobs_are_both_running_keeps_its_mark_put_off_until_one_ends(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither running job is sure to have read the turn that set the mark: clearing
    # it would leave that turn's facts to a next turn that may never come.
    monkeypatch.setattr(queue, "BUSY_PUT_OFF_MS", 300)
    q = Queue("memory", connection=r)
    sid = uuid.uuid4().hex
    first, follow_up = job_ids(sid)
    for jid in (first, follow_up):
        assert enqueue_extraction(r, sid)
        _running(q, jid)
    r.zadd(keys.MEMORY_DUE, {sid: 1000})
    before = int(time.time() * 1000)
    dispatch_due(r)
    put_off = r.zscore(keys.MEMORY_DUE, sid)
    assert put_off is not None and put_off >= before + 300
    dispatch_due(r)  # not due yet: not even looked at
    assert r.zscore(keys.MEMORY_DUE, sid) == put_off
    # A turn ending now marks it again: the later time stays (GT), the mark one.
    r.zadd(keys.MEMORY_DUE, {sid: int(before)}, gt=True)
    assert r.zscore(keys.MEMORY_DUE, sid) == put_off
    job = q.fetch_job(first)
    assert job is not None
    job.set_status(JobStatus.FINISHED)
    wait_until(lambda: time.time() * 1000 > put_off, "the mark's time to come")
    dispatch_due(r)
    assert r.zscore(keys.MEMORY_DUE, sid) is None
    queued = q.fetch_job(first)
    assert queued is not None and queued.get_status() == JobStatus.QUEUED
    for jid in (first, follow_up):
        found = q.fetch_job(jid)
        if found is not None:
            found.delete()
