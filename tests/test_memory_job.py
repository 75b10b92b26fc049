"""The memory-extraction job: lock, content-hash cursor, rolling summary, rq, races."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import REGISTRY
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.utils import import_attribute

from app.embeddings import shared_embedder
from app.memory import Fact, RuleExtractor, queue
from app.memory.facts import cap, rank
from app.memory.queue import enqueue_after_lock, enqueue_extraction, job_ids
from app.sessions.messages import Message, build, canonical_json
from app.settings import Settings
from app.stores import keys, scripts
from workers.memory_job import (
    collapse_mined,
    collapsible,
    extract_memories,
    run_extraction,
    select_delta,
)

TURNS = [
    ("Hi! I'm allergic to peanuts.", "Noted, I'll keep that in mind."),
    ("I live in Lisbon.", "Lisbon is lovely."),
    ("I work at Acme.", "Acme, got it."),
    ("I love jazz.", "Jazz it is."),
]


@pytest.fixture
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


def turn(sid: str, seq: int, n: int) -> list[Message]:
    said, answer = TURNS[n]
    return [build(sid, seq, "user", said), build(sid, seq + 1, "assistant", answer)]


def new_session(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, history: list[Message] | None = None
) -> str:
    sid = keys.new_session_id()
    pg.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (sid, user))
    r.set(keys.session_user(sid), user, ex=3600)
    r.execute_command("JSON.SET", keys.session(sid), ".", "[]")  # type: ignore[no-untyped-call]
    r.expire(keys.session(sid), 3600)
    if history:
        append(r, pg, sid, history)
    return sid


def append(r: redis.Redis, pg: psycopg.Connection[Any], sid: str, batch: list[Message]) -> None:
    """Append to Redis and persist to PostgreSQL, as a completed turn does."""
    for m in batch:
        r.execute_command(  # type: ignore[no-untyped-call]
            "JSON.ARRAPPEND", keys.session(sid), ".", canonical_json(m)
        )
        pg.execute(
            "INSERT INTO messages (session_id, seq, role, content, hash, created_at, body)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (sid, m["seq"], m["role"], m["content"], m["hash"], m["created_at"], canonical_json(m)),
        )


def one_turn(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str
) -> tuple[str, list[Message]]:
    """A new session holding one turn (two messages), not mined yet."""
    sid = new_session(r, pg, user)
    batch = turn(sid, 0, 0)
    append(r, pg, sid, batch)
    return sid, batch


def memories(pg: psycopg.Connection[Any], user: str) -> list[tuple[str, str]]:
    rows = pg.execute(
        "SELECT kind, content FROM memories WHERE user_id = %s ORDER BY kind, content", (user,)
    ).fetchall()
    return [(str(k), str(c)) for k, c in rows]


def cursor(r: redis.Redis, sid: str) -> str | None:
    raw = r.get(keys.memory_cursor(sid))
    return raw.decode() if isinstance(raw, bytes) else None


class Recording:
    """The offline extractor, remembering which seqs it was shown."""

    def __init__(self) -> None:
        self.inner = RuleExtractor()
        self.seen: list[list[int]] = []

    def extract(self, messages: list[dict[str, Any]], summary: str) -> list[Fact]:
        self.seen.append([int(m["seq"]) for m in messages])
        return self.inner.extract(messages, summary)


def test_the_job_mines_the_delta_moves_the_cursor_and_mirrors_it_to_postgres(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings
) -> None:
    sid = new_session(r, pg, user)
    history = turn(sid, 0, 0) + turn(sid, 2, 1)
    append(r, pg, sid, history)
    out = extract_memories(sid)
    assert out == {"delta": 4, "facts": 2, "dropped": 0, "inserted": 2, "updated": 0,
                   "unchanged": 0, "evicted": 0, "advanced": True, "collapsed": 0}
    assert memories(pg, user) == [("allergy", "is allergic to peanuts"),
                                  ("location", "lives in Lisbon")]
    assert cursor(r, sid) == history[-1]["hash"]
    summary = r.get(keys.memory_summary(sid))
    assert isinstance(summary, bytes) and b"Lisbon" in summary
    row = pg.execute("SELECT cursor_hash, summary FROM sessions WHERE id = %s", (sid,)).fetchone()
    assert row == (history[-1]["hash"], summary.decode())
    assert extract_memories(sid) == {"delta": 0}
    assert not r.exists(keys.memory_lock(sid))


def test_eight_workers_racing_on_one_session_extract_each_delta_exactly_once(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings
) -> None:
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0))
    results: list[dict[str, Any]] = []
    positions: list[int] = []
    done = threading.Event()

    def worker() -> None:
        while not done.is_set():
            results.append(extract_memories(sid))

    def watch_cursor() -> None:
        while not done.is_set():
            c = cursor(r, sid)
            raw = r.execute_command("JSON.GET", keys.session(sid), ".")  # type: ignore[no-untyped-call]
            seqs = {m["hash"]: m["seq"] for m in json.loads(raw)}
            positions.append(seqs[c] if c else -1)
            time.sleep(0.005)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    threads.append(threading.Thread(target=watch_cursor))
    for t in threads:
        t.start()
    try:
        for n in (1, 2, 3):
            time.sleep(0.3)
            append(r, pg, sid, turn(sid, 2 * n, n))
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
    results.append(extract_memories(sid))  # whatever the last append left
    advanced = [x for x in results if x.get("advanced")]
    # Every message mined once, every fact inserted once, by whichever worker held the lock.
    assert sum(x["delta"] for x in advanced) == 8
    assert sum(x["inserted"] for x in advanced) == 4
    assert not [x for x in results if "delta" in x and x["delta"] and not x.get("advanced")]
    assert len(memories(pg, user)) == 4
    assert len(r.keys(f"memory:{user}:*")) == 4
    assert positions == sorted(positions)
    assert cursor(r, sid) is not None


def test_a_worker_killed_mid_job_leaves_a_lock_that_expires_and_another_worker_finishes(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMORY_LOCK_TTL_SECONDS", "2")
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0))
    dying = (
        "import os, signal, redis\n"
        "from app.stores import scripts\n"
        f"c = redis.Redis.from_url({stores_env.redis_url!r})\n"
        f"assert scripts.run(c, scripts.acquire_lock({sid!r}, 'doomed', 2000)) == 1\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", dying], timeout=60, check=False)
    assert proc.returncode == -9
    assert r.get(keys.memory_lock(sid)) == b"doomed"
    assert extract_memories(sid) == {"skipped": "locked"}
    deadline = time.monotonic() + 5
    while r.exists(keys.memory_lock(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = extract_memories(sid)
    assert out["advanced"] and out["inserted"] == 1


def test_a_stale_token_can_neither_advance_the_cursor_nor_release_the_lock(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str
) -> None:
    sid = new_session(r, pg, user)
    assert scripts.run(r, scripts.acquire_lock(sid, "stale", 50)) == 1
    time.sleep(0.1)
    assert scripts.run(r, scripts.acquire_lock(sid, "fresh", 10_000)) == 1
    assert scripts.run(r, scripts.advance_cursor(
        sid, "stale", None, "ab" * 32, "s", 60, expected_seq=None, new_seq=1)) == 0
    assert scripts.run(r, scripts.extend_lock(sid, "stale", 10_000)) == 0
    assert scripts.run(r, scripts.release_lock(sid, "stale")) == 0
    assert r.get(keys.memory_lock(sid)) == b"fresh"
    assert cursor(r, sid) is None
    assert scripts.run(r, scripts.release_lock(sid, "fresh")) == 1


def test_a_worker_that_loses_its_lock_while_extracting_writes_nothing(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, settings: Settings
) -> None:
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0))

    class Slow(Recording):
        def extract(self, messages: list[dict[str, Any]], summary: str) -> list[Fact]:
            r.set(keys.memory_lock(sid), "someone-else")  # our lock expired and was retaken
            return super().extract(messages, summary)

    embedder = shared_embedder(settings.embedding_model)
    out = run_extraction(r, pg, sid, settings, Slow(), embedder)
    assert out == {"skipped": "lock_lost", "delta": 2}
    assert memories(pg, user) == [] and cursor(r, sid) is None
    assert r.get(keys.memory_lock(sid)) == b"someone-else"  # not released by the loser
    r.delete(keys.memory_lock(sid))


def test_after_older_messages_are_trimmed_from_redis_only_new_messages_are_mined(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, settings: Settings
) -> None:
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0) + turn(sid, 2, 1))
    embedder = shared_embedder(settings.embedding_model)
    first = Recording()
    assert run_extraction(r, pg, sid, settings, first, embedder)["advanced"]
    # Everything mined leaves Redis, the cursor message too: its seq comes from PostgreSQL.
    r.execute_command("JSON.ARRTRIM", keys.session(sid), ".", 4, 4)  # type: ignore[no-untyped-call]
    assert r.execute_command("JSON.ARRLEN", keys.session(sid), ".") == 0  # type: ignore[no-untyped-call]
    append(r, pg, sid, turn(sid, 4, 2))
    second = Recording()
    out = run_extraction(r, pg, sid, settings, second, embedder)
    assert second.seen == [[4, 5]]
    assert out["inserted"] == 1 and out["advanced"]
    assert len(memories(pg, user)) == 3


def test_select_delta_follows_the_hash_and_falls_back_to_the_cursor_seq() -> None:
    sid = keys.new_session_id()
    history = turn(sid, 0, 0) + turn(sid, 2, 1)
    assert select_delta(history, None) == history
    assert select_delta(history, history[1]["hash"]) == history[2:]
    assert select_delta(history[2:], history[1]["hash"]) is None
    assert select_delta(history[3:], history[1]["hash"], cursor_seq=1) == history[3:]


def test_collapse_trims_only_mined_messages_for_the_lock_holder(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, settings: Settings
) -> None:
    sid = new_session(r, pg, user)
    history = turn(sid, 0, 0) + turn(sid, 2, 1) + turn(sid, 4, 2)
    append(r, pg, sid, history)
    assert collapsible(history, None, 2) == 0
    assert collapsible(history, history[3]["hash"], 1) == 3  # the cursor message stays
    assert collapsible(history, history[3]["hash"], 4) == 2  # and so do the last keep_last
    r.set(keys.memory_cursor(sid), history[3]["hash"])
    assert scripts.run(r, scripts.acquire_lock(sid, "holder", 10_000)) == 1
    assert collapse_mined(r, sid, "intruder", keep_last=1) == 0
    assert collapse_mined(r, sid, "holder", keep_last=1) == 3
    raw = r.execute_command("JSON.GET", keys.session(sid), ".")  # type: ignore[no-untyped-call]
    assert [m["seq"] for m in json.loads(raw)] == [3, 4, 5]
    scripts.run(r, scripts.release_lock(sid, "holder"))


def test_one_waiting_job_per_session_and_one_more_behind_a_running_one(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str
) -> None:
    sid = new_session(r, pg, user)
    first, follow_up = job_ids(sid)
    q = Queue("memory", connection=r)
    assert enqueue_extraction(r, sid) is True
    assert enqueue_extraction(r, sid) is False
    job = q.fetch_job(first)
    assert job is not None
    q.remove(job)
    job.set_status(JobStatus.STARTED)  # as if a worker had picked it up
    assert enqueue_extraction(r, sid) is True
    assert enqueue_extraction(r, sid) is False
    assert q.fetch_job(follow_up) is not None
    for jid in (first, follow_up):
        found = q.fetch_job(jid)
        if found is not None:
            found.delete()


def _dequeued_by_a_worker_that_then_died(r: redis.Redis, q: Queue, jid: str) -> None:
    """What rq's worker does first (BLMOVE into its intermediate list), for this job;
    killed before it marks the job started, it leaves the job QUEUED in no queue."""
    pipe = r.pipeline(transaction=True)
    pipe.lrem(q.key, 1, jid)
    pipe.rpush(q.intermediate_queue_key, jid)
    assert pipe.execute()[0] == 1


def test_a_job_whose_worker_died_as_it_dequeued_it_does_not_block_the_next_turns(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str
) -> None:
    # Chaos test, WORKER_CLASS=simple: such a job looked "waiting" to every later turn,
    # which enqueued nothing, and rq only retries it after a minute.
    sid = new_session(r, pg, user)
    first, follow_up = job_ids(sid)
    after_lock = f"memory-extract-{sid}-after-lock"
    q = Queue("memory", connection=r)
    try:
        assert enqueue_extraction(r, sid) is True
        _dequeued_by_a_worker_that_then_died(r, q, first)
        lost = q.fetch_job(first)
        assert lost is not None and lost.get_status() == JobStatus.QUEUED
        assert enqueue_extraction(r, sid) is True
        assert r.lpos(q.key, follow_up) is not None
        assert enqueue_extraction(r, sid) is False  # the follow-up is really waiting

        assert enqueue_after_lock(r, sid, 60) is True
        assert enqueue_after_lock(r, sid, 60) is False
        scheduled = q.fetch_job(after_lock)
        assert scheduled is not None
        q.enqueue_job(scheduled)  # due: the scheduler queues it ...
        _dequeued_by_a_worker_that_then_died(r, q, after_lock)  # ... and it is lost
        assert enqueue_after_lock(r, sid, 60) is True
    finally:
        for jid in (first, follow_up, after_lock):
            r.lrem(q.key, 0, jid)
            r.lrem(q.intermediate_queue_key, 0, jid)
            found = q.fetch_job(jid)
            if found is not None:
                found.delete()


def mined_once(r: redis.Redis, pg: psycopg.Connection[Any], user: str) -> tuple[str, Queue, Job]:
    """A session with one turn, its extraction queued and run by an in-process
    SimpleWorker: (sid, the memory queue, the finished job)."""
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0))
    assert enqueue_extraction(r, sid)
    q = Queue("memory", connection=r)
    SimpleWorker([q], connection=r).work(burst=True)
    job = q.fetch_job(job_ids(sid)[0])
    assert job is not None and job.get_status() == JobStatus.FINISHED
    return sid, q, job


def test_the_job_runs_in_process_under_a_simple_worker(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings
) -> None:
    sid, q, job = mined_once(r, pg, user)
    assert job.return_value() == {"delta": 2, "facts": 1, "dropped": 0, "inserted": 1,
                                  "updated": 0, "unchanged": 0, "evicted": 0, "advanced": True,
                                  "collapsed": 0}
    assert enqueue_extraction(r, sid)  # a finished job frees its id for the next turn
    SimpleWorker([q], connection=r).work(burst=True)
    # The app names the job by path (it never imports workers): the path must resolve.
    assert import_attribute(queue.JOB) is extract_memories


def test_a_job_whose_killed_run_left_a_dangling_execution_is_freed_for_the_next_turn(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings
) -> None:
    sid, q, job = mined_once(r, pg, user)
    # What a worker SIGKILLed mid-run leaves (seen under tests/test_chaos.py): the job's
    # execution registry still names a run whose record has expired. rq's own delete
    # then raises on every try, and the session could never be queued again.
    r.zadd(job.execution_registry.key, {"a-run-whose-record-expired": time.time() + 600})
    with pytest.raises(ValueError, match="not found"):
        q.fetch_job(job_ids(sid)[0]).delete()  # type: ignore[union-attr]
    assert enqueue_extraction(r, sid)
    again = q.fetch_job(job_ids(sid)[0])
    assert again is not None and again.get_status() == JobStatus.QUEUED
    SimpleWorker([q], connection=r).work(burst=True)
    assert again.get_status(refresh=True) == JobStatus.FINISHED


@pytest.mark.slow
def test_the_job_runs_under_a_real_backbone_worker_burst(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, settings: Settings,
    project_root: Any,
) -> None:
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 1))
    assert enqueue_extraction(r, sid)
    env = {**os.environ, "REDIS_URL": settings.redis_url or "",
           "DATABASE_URL": settings.database_url or "", "AUTH_SECRET": settings.auth_secret or ""}
    backbone = project_root / ".venv" / "bin" / "backbone"
    proc = subprocess.run([str(backbone), "worker", "--burst"], env=env, cwd=project_root,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert memories(pg, user) == [("location", "lives in Lisbon")]
    assert cursor(r, sid) is not None


def test_the_cursor_never_moves_backwards(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str
) -> None:
    sid = new_session(r, pg, user)
    history = [*turn(sid, 0, 0), *turn(sid, 2, 1)]
    append(r, pg, sid, history)
    assert scripts.run(r, scripts.acquire_lock(sid, "t", 10_000)) == 1

    def advance(expected: Message | None, new: Message) -> int:
        return scripts.run(r, scripts.advance_cursor(
            sid, "t", expected["hash"] if expected else None, new["hash"], "s", 60,
            expected_seq=int(expected["seq"]) if expected else None, new_seq=int(new["seq"])))

    assert advance(None, history[2]) == 1
    assert r.get(keys.memory_cursor_seq(sid)) == b"2"
    # Back to an earlier message, or to the same one: refused, the cursor stays.
    assert advance(history[2], history[1]) == -2
    assert advance(history[2], history[2]) == -2
    assert cursor(r, sid) == history[2]["hash"]
    # A cursor without a stored seq (written before seqs were kept): the caller's seq orders it.
    r.delete(keys.memory_cursor_seq(sid))
    assert advance(history[2], history[0]) == -2
    assert advance(history[2], history[3]) == 1
    assert cursor(r, sid) == history[3]["hash"] and r.get(keys.memory_cursor_seq(sid)) == b"3"
    assert scripts.run(r, scripts.release_lock(sid, "t")) == 1


def test_a_delete_removes_the_cursor_seq_with_the_cursor() -> None:
    sid = keys.new_session_id()
    assert keys.memory_cursor_seq(sid) in keys.session_keys(sid)
    assert keys.memory_cursor_seq(sid).startswith(keys.memory_cursor(sid))


def test_a_job_that_finds_the_session_locked_schedules_another_for_when_the_lock_runs_out(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings,
) -> None:
    # The holder may be a worker killed mid-job: its delta must not wait for a next turn.
    sid = new_session(r, pg, user)
    append(r, pg, sid, turn(sid, 0, 0))
    assert scripts.run(r, scripts.acquire_lock(sid, "dead-worker", 3000)) == 1
    assert extract_memories(sid) == {"skipped": "locked"}
    job = Queue("memory", connection=r).fetch_job(f"memory-extract-{sid}-after-lock")
    assert job is not None and job.get_status() == JobStatus.SCHEDULED
    assert import_attribute(job.func_name) is extract_memories and job.args == (sid,)
    # A second skip while one is scheduled adds nothing.
    assert extract_memories(sid) == {"skipped": "locked"}
    scheduled = r.zrange("rq:scheduled:memory", 0, -1)
    assert scheduled.count(job.id.encode()) == 1
    r.delete(keys.memory_lock(sid))
    job.delete()


def test_a_retried_job_takes_over_the_lock_its_killed_run_left_and_other_jobs_still_wait(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings,
) -> None:
    # A simple worker SIGKILLed mid-job leaves its lock for MEMORY_LOCK_TTL_SECONDS;
    # rq re-runs the job (same id) once the heartbeat lapses: it must not wait 5 minutes.
    sid, batch = one_turn(r, pg, user)
    first, follow_up = job_ids(sid)
    q = Queue("memory", connection=r)
    assert scripts.run(r, scripts.acquire_lock(sid, f"job:{first}", 300_000)) == 1
    blocked = q.enqueue_call("workers.memory_job.extract_memories", args=(sid,),
                             job_id=follow_up)
    SimpleWorker([q], connection=r).work(burst=True)
    assert blocked.return_value() == {"skipped": "locked"}
    assert cursor(r, sid) is None
    retried = q.enqueue_call("workers.memory_job.extract_memories", args=(sid,), job_id=first)
    SimpleWorker([q], connection=r).work(burst=True)
    outcome = retried.return_value()
    assert outcome is not None and "skipped" not in outcome and outcome["delta"] == 2
    assert cursor(r, sid) == batch[-1]["hash"]
    assert r.get(keys.memory_lock(sid)) is None  # released, not left to its TTL
    after_lock = q.fetch_job(f"memory-extract-{sid}-after-lock")  # the blocked job's
    if after_lock is not None:
        after_lock.delete()


def test_a_job_dequeued_by_a_worker_killed_before_it_started_is_queued_again(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings,
) -> None:
    # A worker on several queues pops with BLPOP; SIGKILLed before it marks the job
    # started, the job stays "queued" in no list, and the session was never mined again.
    sid, batch = one_turn(r, pg, user)
    first, _ = job_ids(sid)
    q = Queue("memory", connection=r)
    assert enqueue_extraction(r, sid) is True
    assert r.lrem(q.key, 0, first) == 1  # what the killed worker's BLPOP took with it
    assert enqueue_extraction(r, sid) is True
    assert r.lpos(q.key, first) is not None
    assert enqueue_extraction(r, sid) is False  # really waiting now: nothing more
    SimpleWorker([q], connection=r).work(burst=True)
    assert cursor(r, sid) == batch[-1]["hash"]


def flood_message(chars: int = 15_000) -> str:
    """The review's message: distinct "I like x. / I live in Y." sentences, `chars` long."""
    syllables = ["ka", "lo", "mi", "ren", "tu", "vo", "sa", "dri", "pel", "zan", "qui", "bor"]
    words = ["".join(p) for p in itertools.product(syllables, repeat=3)]
    random.Random(7).shuffle(words)
    parts: list[str] = []
    for i in itertools.count(0, 2):
        if len(" ".join(parts)) >= chars:
            break
        parts += [f"I like {words[i]}.", f"I live in {words[i + 1].title()}."]
    return " ".join(parts)[:chars]


def test_one_message_of_hundreds_of_distinct_facts_becomes_at_most_twenty_memories(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, stores_env: Settings
) -> None:
    text = flood_message()
    found = RuleExtractor().extract([{"role": "user", "content": text}], "")
    assert len(text) == 15_000 and len(found) > 500  # what the review saw stored
    sid = new_session(r, pg, user)
    append(r, pg, sid, [build(sid, 0, "user", text), build(sid, 1, "assistant", "Noted.")])
    dropped = REGISTRY.get_sample_value("backbone_memory_facts_dropped_total") or 0.0
    out = extract_memories(sid)
    assert out["facts"] == 20 and out["dropped"] == len(found) - 20 and out["advanced"]
    stored = memories(pg, user)
    assert 0 < len(stored) <= 20 and len(r.keys(f"memory:{user}:*")) == len(stored)
    # The extractor's ranking chose them: places before tastes.
    assert {kind for kind, _ in stored} == {"location"}
    assert REGISTRY.get_sample_value("backbone_memory_facts_dropped_total") == dropped + len(
        found) - 20


def test_the_cap_keeps_the_best_ranked_facts_in_the_extractors_order() -> None:
    facts = [Fact("preference", "likes jazz"), Fact("note", "has a cat"),
             Fact("allergy", "is allergic to peanuts"), Fact("preference", "likes tea"),
             Fact("location", "lives in Lisbon")]
    kept, dropped = cap(facts, 3)
    assert kept == [facts[2], facts[4], facts[0]] and dropped == 2
    assert cap(facts, 20) == (rank(facts), 0)
