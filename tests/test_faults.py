"""Faults with real processes: kill Redis, stop PostgreSQL, kill the app or a worker.

Each test that kills something runs its own Redis + PostgreSQL
(`faults_support.private_stack`) and its own `backbone serve` / `backbone
worker`, never the session-wide servers the other tests share. What every test
proves is the promise of docs/reliability.md: nothing acknowledged is lost, and a
fault reaches the client as an `error` event or a tool error, never a hung stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from fakes import Failure, FakeOpenAI, FakeSearxng, text_reply, tool_call_reply
from faults_support import (
    Events,
    Stack,
    count,
    holding_model,
    pg_history,
    private_stack,
    ready_status,
    redis_history,
    run_sweep,
    serve,
    silent_server,
    wait_for,
    worker,
)
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from sse import Frame, frames
from starlette.testclient import TestClient

from app.api import create_app
from app.memory.queue import enqueue_extraction, job_ids
from app.sessions import messages
from app.sessions.store import PERSIST_WAIT_SECONDS
from app.settings import Settings
from app.stores import keys, scripts

Headers = Callable[[str], dict[str, str]]

# The offline provider quotes the question when the (empty) knowledge base has
# nothing, so a long question makes an answer that streams for seconds at 50 ms a word.
QUESTION = " ".join(f"word{i}" for i in range(70))
SLOW = {"OFFLINE_TOKEN_DELAY_MS": "50"}
# An httpx read that waits longer than this means the stream hung: the test fails.
READ_TIMEOUT = 20.0


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Where the private processes write their logs."""
    return tmp_path


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    # Not under pytest's basetemp: every pytest session on the machine chmods that
    # to 0700, and PostgreSQL (run as user pgserver when we are root) could then
    # no longer reach its data to start again. Short, too: its Unix socket is in it.
    data = Path(tempfile.mkdtemp(prefix="faults-"))
    try:
        with private_stack(settings, data) as s:
            yield s
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def _turn(
    client: httpx.Client, base: str, sid: str, h: dict[str, str], content: str = QUESTION
) -> Iterator[Events]:
    """POST a question; yield its events once the 200 (the acknowledgement) is in."""
    with client.stream("POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
                       json={"content": content}) as res:
        assert res.status_code == 200, res.read()
        yield Events(res)


def _deltas(n: int) -> Callable[[Frame], bool]:
    seen = [0]

    def enough(frame: Frame) -> bool:
        seen[0] += frame.event == "message.delta"
        return seen[0] >= n

    return enough


def _assert_whole(sid: str, history: list[dict[str, Any]]) -> None:
    """No half-written message: consecutive seqs, every hash verifies, every tool call answered."""
    assert [m["seq"] for m in history] == list(range(len(history)))
    assert all(messages.is_intact(sid, m) for m in history)
    for i, m in enumerate(history):
        calls = [c["id"] for c in m.get("tool_calls") or []]
        if calls:
            answers = history[i + 1 : i + 1 + len(calls)]
            assert [(a["role"], a["tool_call_id"]) for a in answers] == [
                ("tool", c) for c in calls
            ]


def test_redis_killed_mid_stream_ends_the_turn_with_an_error_and_recovers_without_a_restart(
    stack: Stack, folder: Path, token_for: Headers, user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = token_for(user)
    with serve(stack.settings, folder, **SLOW) as app, httpx.Client(
        timeout=httpx.Timeout(10, read=READ_TIMEOUT)
    ) as client:
        sid = client.post(f"{app.url}/v1/sessions", headers=h).json()["id"]
        with _turn(client, app.url, sid, h) as events:
            head = events.until(_deltas(1))
            assert [f.event for f in head[:2]] == ["tool.call", "tool.result"]
            # Deltas stream only after the tool call and its result were appended.
            # AOF everysec may lose the last second of writes on a crash: wait past
            # it, so this test checks what Redis promises, not the fsync timing.
            time.sleep(1.2)
            stack.kill_redis()
            got = events.rest()  # ends by itself; a hang would raise ReadTimeout
        assert got[-1].event == "error", [f.event for f in got]
        assert got[-1].data["code"] == "redis_unavailable"
        assert count(got, "message.done") == 0

        down = client.get(f"{app.url}/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["redis"] is False
        for method, path in (("POST", "/v1/sessions"), ("GET", f"/v1/sessions/{sid}"),
                             ("POST", f"/v1/sessions/{sid}/messages"), ("GET", "/metrics")):
            refused = client.request(method, app.url + path, headers=h, json={"content": "hi"})
            assert refused.status_code == 503, (path, refused.text)
            assert refused.json()["error"]["code"] == "redis_unavailable"
        # A dependency failure is one warning line, not a traceback per request.
        assert "Traceback" not in app.log.read_text(errors="replace")

        stack.restart_redis()  # same port, same folder: the AOF is replayed
        wait_for(lambda: ready_status(app.url) == 200, 10, "/readyz to recover on its own")

        history = client.get(f"{app.url}/v1/sessions/{sid}", headers=h).json()["messages"]
    # Everything stored before the kill came back from the AOF: the question, and the
    # tool call with the result the client saw. The answer being streamed was never stored.
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[0]["content"] == QUESTION
    assert history[1]["tool_calls"][0]["id"] == head[1].data["id"]
    _assert_whole(sid, history)

    client_r = stack.client()
    # the failed persist left its mark
    assert client_r.zscore(keys.unpersisted(sid), sid) is not None
    client_r.close()
    assert run_sweep(stack.settings, monkeypatch)["failed"] == 0
    assert pg_history(stack.settings.database_url or "", sid) == history


def test_postgres_down_when_a_turn_completes_still_sends_message_done_and_the_sweep_persists_it(
    stack: Stack, folder: Path, token_for: Headers, user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = token_for(user)
    db = stack.settings.database_url or ""
    r = stack.client()
    with serve(stack.settings, folder, **SLOW) as app, httpx.Client(
        timeout=httpx.Timeout(10, read=READ_TIMEOUT)
    ) as client:
        sid = client.post(f"{app.url}/v1/sessions", headers=h).json()["id"]
        with _turn(client, app.url, sid, h) as events:
            events.until(_deltas(1))
            stack.stop_postgres()
            got = events.rest()
        # A persistence failure is not the client's problem: the turn ends as usual.
        assert got[-1].event == "message.done", [f.event for f in got]
        assert count(got, "error") == 0

        # A second turn while PostgreSQL is still down: the pool now has no connection
        # to fail fast on. The turn's persist used to wait the pool's 30 s (holding the
        # stream open after message.done); now it gives up after PERSIST_WAIT_SECONDS.
        started = time.monotonic()
        with _turn(client, app.url, sid, h, "and now?") as events:
            again = events.rest()
        assert again[-1].event == "message.done" and count(again, "error") == 0
        assert time.monotonic() - started < PERSIST_WAIT_SECONDS + 8
        assert r.zscore(keys.unpersisted(sid), sid) is not None  # left for the sweep

        down = client.get(f"{app.url}/readyz")
        assert down.status_code == 503 and down.json()["checks"]["postgres"] is False
        stack.start_postgres()
        wait_for(lambda: ready_status(app.url) == 200, 15, "/readyz to recover on its own")

        # A third turn persists fine, but the first is still only in Redis: its persist
        # must not clear the session's mark (it used to, and the sweep then skipped
        # the session, so the first turn never reached PostgreSQL).
        with _turn(client, app.url, sid, h, "one more?") as events:
            assert events.rest()[-1].event == "message.done"
        wait_for(lambda: len(pg_history(db, sid)) >= 4 and pg_history(db, sid)[-1]["seq"] == 11,
                 10, "the third turn's own persist")
        assert r.zscore(keys.unpersisted(sid), sid) is not None

    stored = redis_history(r, sid)
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"] * 3
    counts = run_sweep(stack.settings, monkeypatch)
    assert counts["sessions"] == 1 and counts["failed"] == 0 and counts["messages"] >= 4
    assert r.zscore(keys.unpersisted(sid), sid) is None
    assert run_sweep(stack.settings, monkeypatch)["messages"] == 0
    r.close()
    # Every message exactly once, in order.
    assert pg_history(db, sid) == stored
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT seq FROM messages WHERE session_id = %s ORDER BY seq", (sid,)
        ).fetchall()
    assert [row[0] for row in rows] == list(range(12))


# "tool.call": killed while the tool runs. The call and its result are one atomic
# append, so either both are stored or neither (which, depends on the tool's speed).
# "deltas": killed while the answer streams; the tool pair is stored, the answer not.
@pytest.mark.parametrize("kill_after", ["tool.call", "deltas"])
def test_an_app_killed_mid_stream_leaves_only_whole_messages_that_the_sweep_persists(
    stack: Stack, folder: Path, token_for: Headers, user: str,
    monkeypatch: pytest.MonkeyPatch, kill_after: str,
) -> None:
    stop = (lambda f: f.event == "tool.call") if kill_after == "tool.call" else _deltas(3)
    h = token_for(user)
    with serve(stack.settings, folder, **SLOW) as app, httpx.Client(
        timeout=httpx.Timeout(10, read=READ_TIMEOUT)
    ) as client:
        sid = client.post(f"{app.url}/v1/sessions", headers=h).json()["id"]
        with _turn(client, app.url, sid, h) as events:
            head = events.until(stop)
            app.kill()
            # The connection drops: the client sees no terminal event, and no hang.
            with pytest.raises(httpx.RemoteProtocolError):
                events.rest()
        assert count(head, "message.done") == count(head, "error") == 0

    r = stack.client()
    history = redis_history(r, sid)
    roles = [m["role"] for m in history]
    if kill_after == "tool.call":
        assert roles in (["user"], ["user", "assistant", "tool"])
    else:
        assert roles == ["user", "assistant", "tool"]
    _assert_whole(sid, history)
    assert r.zscore(keys.unpersisted(sid), sid) is not None
    # The turn never reached its persist: PostgreSQL knows the session, not its messages.
    assert pg_history(stack.settings.database_url or "", sid) == []

    assert run_sweep(stack.settings, monkeypatch)["failed"] == 0
    assert pg_history(stack.settings.database_url or "", sid) == history
    assert r.zscore(keys.unpersisted(sid), sid) is None
    r.close()


FACTS = [
    {"kind": "location", "content": "lives in Lisbon"},
    {"kind": "allergy", "content": "is allergic to peanuts"},
]


def _session_with_history(stack: Stack, user: str) -> str:
    """A session whose one turn is in both stores, as after a completed turn."""
    sid = keys.new_session_id()
    turn = [messages.build(sid, 0, "user", "I live in Lisbon and I'm allergic to peanuts."),
            messages.build(sid, 1, "assistant", "Noted.")]
    r = stack.client()
    scripts.run(r, scripts.create_session(sid, user, 3600))
    r.execute_command(  # type: ignore[no-untyped-call]
        "JSON.ARRAPPEND", keys.session(sid), ".", *(messages.canonical_json(m) for m in turn)
    )
    r.close()
    with psycopg.connect(stack.settings.database_url or "", autocommit=True) as conn:
        conn.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (sid, user))
        for m in turn:
            conn.execute(
                "INSERT INTO messages (session_id, seq, role, content, hash, created_at, body)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (sid, m["seq"], m["role"], m["content"], m["hash"], m["created_at"],
                 messages.canonical_json(m)),
            )
    return sid


def test_a_worker_killed_mid_extraction_is_retried_by_another_after_its_lock_expires(
    stack: Stack, folder: Path, user: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sid = _session_with_history(stack, user)
    r = stack.client()
    queue = Queue("memory", connection=r)
    lock_ttl = {"MEMORY_LOCK_TTL_SECONDS": "2"}
    with holding_model(FACTS) as model:
        assert enqueue_extraction(r, sid)
        job_id = job_ids(sid)[0]
        with worker(stack.settings, folder, LLM_BASE_URL=model.url, **lock_ttl) as w:
            # The model holds the first request: the job is mid-extraction, lock taken.
            assert model.holding.wait(60), w.output()
            assert r.exists(keys.memory_lock(sid))
            w.kill()
        job = Job.fetch(job_id, connection=r)
        assert job.get_status() == JobStatus.STARTED  # nobody told rq: it looks alive

        wait_for(lambda: not r.exists(keys.memory_lock(sid)), 5, "the dead worker's lock to expire")

        # rq calls an execution abandoned once its heartbeat lapses (the monitoring
        # interval + 60 s after the last beat). Rather than wait 90 s, clean the
        # registry as of just after that moment.
        started = StartedJobRegistry(queue=queue)
        [(_, lapses_at)] = cast(list[tuple[bytes, float]],
                                r.zrange(started.key, 0, -1, withscores=True))
        started.cleanup(timestamp=lapses_at + 1)
        job = Job.fetch(job_id, connection=r)
        assert job.get_status() == JobStatus.QUEUED  # retried, not dropped
        assert job.retries_left == 1

        for name, value in {"REDIS_URL": stack.settings.redis_url or "",
                            "DATABASE_URL": stack.settings.database_url or "",
                            "LLM_BASE_URL": model.url, **lock_ttl}.items():
            monkeypatch.setenv(name, value)
        SimpleWorker([queue], connection=r).work(burst=True)
        assert job.get_status(refresh=True) == JobStatus.FINISHED, job.latest_result()
        result = job.return_value()
        assert isinstance(result, dict) and result["inserted"] == 2

        # One more extraction finds nothing new and writes nothing twice.
        assert enqueue_extraction(r, sid)
        SimpleWorker([queue], connection=r).work(burst=True)
    r.close()
    with psycopg.connect(stack.settings.database_url or "") as conn:
        rows = conn.execute(
            "SELECT kind, content FROM memories WHERE user_id = %s ORDER BY kind", (user,)
        ).fetchall()
    assert rows == [("allergy", "is allergic to peanuts"), ("location", "lives in Lisbon")]


@pytest.mark.parametrize("worker_class", ["simple", "fork"])
def test_a_job_that_raises_is_retried_then_failed_and_one_that_hangs_is_timed_out(
    stack: Stack, folder: Path, worker_class: str,
) -> None:
    r = stack.client()
    queue = Queue("audit", connection=r)
    # Standard-library functions as jobs: the worker imports them like ours.
    hangs = queue.enqueue("time.sleep", 60, job_timeout=2)
    raises = queue.enqueue("json.loads", "not json", retry=Retry(max=1))
    after = queue.enqueue("os.getpid")
    with worker(stack.settings, folder, WORKER_CLASS=worker_class) as w:
        # The retry goes to the back of the queue, behind `after`: wait for all three.
        wait_for(lambda: after.get_status(refresh=True) == JobStatus.FINISHED
                 and raises.get_status(refresh=True) == JobStatus.FAILED, 60,
                 f"the jobs to end\n{w.output()}")
        assert w.proc.poll() is None, w.output()  # the worker survived both
        # simple runs the job in the worker process; fork in a work horse.
        assert (after.return_value() == w.proc.pid) == (worker_class == "simple")
    assert hangs.get_status(refresh=True) == JobStatus.FAILED
    assert "JobTimeoutException" in (hangs.latest_result().exc_string or "")  # type: ignore[union-attr]
    raises.refresh()  # type: ignore[no-untyped-call]
    assert raises.get_status() == JobStatus.FAILED
    assert raises.retries_left == 0  # ran twice: once, then its one retry
    assert "JSONDecodeError" in (raises.latest_result().exc_string or "")  # type: ignore[union-attr]
    r.close()


def test_a_simple_worker_killed_mid_job_has_the_job_retried_by_the_next_worker_unaided(
    stack: Stack, folder: Path,
) -> None:
    r = stack.client()
    job = Queue("audit", connection=r).enqueue("time.sleep", 6, retry=Retry(max=1))
    with worker(stack.settings, folder, WORKER_CLASS="simple") as w:
        wait_for(lambda: job.get_status(refresh=True) == JobStatus.STARTED, 60,
                 f"the job to start\n{w.output()}")
        w.kill()  # the job dies with it: no work horse to finish it
    # No registry cleanup by hand: the next worker finds the job's heartbeat lapsed.
    with worker(stack.settings, folder, WORKER_CLASS="simple") as w:
        wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED, 90,
                 f"the abandoned job to be retried and finish\n{w.output()}")
    job.refresh()  # type: ignore[no-untyped-call]
    assert job.retries_left == 0
    r.close()


@pytest.fixture
def searxng_down() -> Iterator[str]:
    with silent_server() as url:
        yield url


def _tool_turn(settings: Settings, searxng_url: str, token_for: Headers, user: str) -> list[Frame]:
    fake = FakeOpenAI()
    fake.script(tool_call_reply("web_search", {"query": "redis aof"}), text_reply("Answered."))
    with fake.serve() as base:
        s = dataclasses.replace(settings, llm_base_url=base + "/v1", searxng_url=searxng_url,
                                tool_timeout_seconds=1.0, offline_token_delay_ms=0)
        h = token_for(user)
        with TestClient(create_app(s)) as c:
            sid = c.post("/v1/sessions", headers=h).json()["id"]
            with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                          json={"content": "what is new with redis aof?"}) as res:
                assert res.status_code == 200
                got = frames(res.iter_lines())
            history = c.get(f"/v1/sessions/{sid}", headers=h).json()["messages"]
    # The model was shown the failure as the tool's answer, and the history pairs them.
    assert fake.requests[-1]["messages"][-1]["role"] == "tool"
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    return got


def test_a_search_service_that_never_answers_times_out_and_the_turn_still_finishes(
    settings: Settings, searxng_down: str, token_for: Headers, user: str
) -> None:
    started = time.monotonic()
    got = _tool_turn(settings, searxng_down, token_for, user)
    result = next(f for f in got if f.event == "tool.result")
    assert "within 1 s" in result.data["error"]
    assert got[-1].event == "message.done"
    assert got[-1].data["message"]["content"] == "Answered."
    assert time.monotonic() - started < 15


def test_a_search_service_answering_500_is_a_tool_error_and_the_turn_still_finishes(
    settings: Settings, token_for: Headers, user: str
) -> None:
    searx = FakeSearxng()
    searx.failure = Failure(500, "<html>Internal Server Error</html>")
    with searx.serve() as url:
        got = _tool_turn(settings, url, token_for, user)
    result = next(f for f in got if f.event == "tool.result")
    assert "HTTP 500" in result.data["error"]
    assert got[-1].event == "message.done"
