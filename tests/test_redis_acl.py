"""The least-privilege Redis user of deploy/redis/users.acl (used by compose.yaml)
runs the whole app and its workers, and nothing else."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.api import create_app
from app.memory.queue import dispatch_all, enqueue_extraction
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.embedded import EmbeddedRedis, free_port
from app.stores import scripts

Headers = Callable[[str], dict[str, str]]
ACL = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "users.acl"


def _password(user: str) -> str:
    m = re.search(rf"^user {user} on >(\S+)", ACL.read_text(), re.M)
    assert m, f"no password for {user} in {ACL}"
    return m.group(1)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("acl-redis")
    server = EmbeddedRedis(folder, free_port(), extra_args=("--aclfile", str(ACL)))
    server.start()
    yield server.port
    server.stop()


@pytest.fixture
def admin(acl_redis: int) -> Iterator[redis.Redis]:
    conn = redis.Redis(port=acl_redis, username="admin", password=_password("admin"))
    yield conn
    conn.close()


def _denied(admin: redis.Redis) -> list[str]:
    """What ACL LOG saw the limited user refused, except the MODULE LIST that
    app/stores.py tries first on purpose (it then probes each module)."""
    entries = admin.execute_command("ACL", "LOG")  # type: ignore[no-untyped-call]
    found = []
    for e in entries:
        row = {k.decode() if isinstance(k, bytes) else k: v for k, v in
               (e.items() if isinstance(e, dict) else zip(e[::2], e[1::2], strict=True))}
        text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in row.items()}
        if text["username"] == "backbone" and text["object"] != "module|list":
            found.append(f"{text['reason']}: {text['object']}")
    return found


@pytest.fixture
def limited(settings: Settings, acl_redis: int, monkeypatch: pytest.MonkeyPatch) -> Settings:
    url = f"redis://backbone:{_password('backbone')}@127.0.0.1:{acl_redis}/0"
    monkeypatch.setenv("REDIS_URL", url)  # the jobs read it, as in a worker
    monkeypatch.setenv("DATABASE_URL", settings.database_url or "")
    s = dataclasses.replace(settings, redis_url=url, offline_token_delay_ms=0)
    prepare(s)  # modules (probed: MODULE LIST is denied), indexes, scripts
    return s


def test_the_app_and_its_jobs_run_as_the_limited_user(
    limited: Settings, admin: redis.Redis, token_for: Headers, user: str
) -> None:
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    with TestClient(create_app(limited)) as c:
        assert c.get("/readyz").json()["checks"]["redis_modules"] is True
        h = token_for(user)
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                      json={"content": "I live in Lisbon. How does AOF work?"}) as res:
            assert frames(res.iter_lines())[-1].event == "message.done"
    conn = redis.Redis.from_url(limited.redis_url or "")
    wait_until(lambda: conn.zscore("memory-due", sid) is not None, "the turn's due mark")
    assert dispatch_all(conn) >= 1  # as a worker's dispatcher, as the limited user
    assert Queue("memory", connection=conn).count >= 1
    for name in ("memory", "persist"):
        q = Queue(name, connection=conn)
        if name == "persist":
            q.enqueue("workers.jobs.sweep_unpersisted", 0.0)
        SimpleWorker([q], connection=conn).work(burst=True)
        assert q.failed_job_registry.count == 0, f"a {name} job failed under the ACL"
    conn.close()
    assert _denied(admin) == [], "the app or a job ran a command the ACL refuses"


def test_a_job_that_finds_its_session_locked_schedules_its_follow_up_as_the_limited_user(
    limited: Settings, admin: redis.Redis
) -> None:
    # The locked path reads the lock's PTTL to schedule `-after-lock`: refused, the job
    # failed and (the dispatcher having cleared the mark) the turn's facts were lost.
    conn = redis.Redis.from_url(limited.redis_url or "")
    sid = uuid.uuid4().hex
    assert scripts.run(conn, scripts.acquire_lock(sid, "a-worker-killed-mid-job", 60_000))
    lock_ends = time.time() + 60
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    assert enqueue_extraction(conn, sid)
    q = Queue("memory", connection=conn)
    SimpleWorker([q], connection=conn).work(burst=True)
    assert q.failed_job_registry.count == 0, "the locked path failed under the ACL"
    follow_up = q.fetch_job(f"memory-extract-{sid}-after-lock")
    assert follow_up is not None and follow_up.get_status() == JobStatus.SCHEDULED
    # Scheduled for when that lock runs out (read with PTTL), plus a second.
    assert lock_ends - 1 < conn.zscore("rq:scheduled:memory", follow_up.id) <= lock_ends + 2
    assert _denied(admin) == [], "the locked path ran a command the ACL refuses"
    follow_up.delete()
    conn.close()


def test_a_real_forking_worker_with_its_scheduler_runs_as_the_limited_user(
    limited: Settings, admin: redis.Redis, project_root: Path
) -> None:
    conn = redis.Redis.from_url(limited.redis_url or "")
    Queue("persist", connection=conn).enqueue("workers.jobs.sweep_unpersisted", 0.0)
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    env = {**os.environ, "REDIS_URL": limited.redis_url or "",
           "DATABASE_URL": limited.database_url or "", "AUTH_SECRET": limited.auth_secret or "",
           "PYTHONPATH": str(project_root)}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--burst"], env=env,
                          cwd=project_root, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NOPERM" not in proc.stderr, proc.stderr[-2000:]
    assert Queue("persist", connection=conn).failed_job_registry.count == 0
    conn.close()
    assert _denied(admin) == [], "rq's worker or scheduler ran a command the ACL refuses"


def test_a_waiting_worker_blocks_for_jobs_as_the_limited_user(
    limited: Settings, admin: redis.Redis, project_root: Path
) -> None:
    # Not --burst, as `backbone up` and compose run it: on several queues rq waits
    # with BLPOP (a burst run only polls with LPOP, so the test above never sees it).
    conn = redis.Redis.from_url(limited.redis_url or "")
    admin.execute_command("ACL", "LOG", "RESET")  # type: ignore[no-untyped-call]
    env = {**os.environ, "REDIS_URL": limited.redis_url or "",
           "DATABASE_URL": limited.database_url or "", "AUTH_SECRET": limited.auth_secret or "",
           "PYTHONPATH": str(project_root)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env,
                            cwd=project_root, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # let it start waiting on its queues before the job arrives
        job = Queue("persist", connection=conn).enqueue("workers.jobs.sweep_unpersisted", 0.0)
        # A turn's mark, as the app writes it: the worker's dispatcher queues its job.
        sid = uuid.uuid4().hex
        conn.zadd("memory-due", {sid: 1})
        deadline = time.monotonic() + 60
        while (job.get_status(refresh=True) != JobStatus.FINISHED
               or conn.zscore("memory-due", sid) is not None):
            assert time.monotonic() < deadline and proc.poll() is None, job.get_status()
            time.sleep(0.2)
        assert Queue("memory", connection=conn).fetch_job(f"memory-extract-{sid}") is not None
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    assert "NOPERM" not in stderr, stderr[-2000:]
    conn.close()
    assert _denied(admin) == [], "a waiting worker ran a command the ACL refuses"


SID = "0" * 32


@pytest.mark.parametrize("command", [
    ("JSON.TYPE", f"session:{{{SID}}}"), ("EXISTS", f"session:{{{SID}}}:deleted"),
    ("ZCARD", "ratelimit:{someone}:sessions"), ("FT._LIST",), ("SCAN", "0", "MATCH", "cache:*"),
    ("HGETALL", "cache-stats:kb_search"), ("LLEN", "rq:queue:memory"),
    ("LPOS", "rq:queue:memory", "memory-extract-x"),  # app.memory.queue: is it really waiting
    ("ZADD", "memory-due", "1", SID),  # app.memory.queue.mark_due, after every turn
    ("ZADD", "memory-due", "XX", "GT", "1", SID),  # dispatch_due puts a busy session off
    ("ZRANGEBYSCORE", "memory-due", "-inf", "1", "WITHSCORES", "LIMIT", "0", "100"),
    ("PTTL", f"memory-task-lock:{{{SID}}}"),  # a locked job schedules its follow-up
    ("SET", f"cache-audit:{SID}", "{}", "EX", "60"),  # app.cache.audit_queue: the audit input
    ("GETDEL", f"cache-audit:{SID}"),  # workers.audit reads it once
    # ... and with tracing on, the turn's trace context beside the mark
    ("SET", f"memory-due-trace:{{{SID}}}", "{}", "EX", "3600"),
])
def test_the_limited_user_may_run_what_the_app_runs_on_its_own_keys(
    limited: Settings, command: tuple[str, ...]
) -> None:
    conn = redis.Redis.from_url(limited.redis_url or "")
    # raises NoPermissionError if the ACL refuses it
    conn.execute_command(*command)  # type: ignore[no-untyped-call]
    conn.close()


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "dir"), ("KEYS", "*"),
    ("SET", "elsewhere", "1"), ("ACL", "SETUSER", "intruder", "on"), ("SHUTDOWN",),
    # not dangerous, but nothing in the app or its workers runs them:
    ("CLIENT", "LIST"), ("APPEND", "rq:a", "x"), ("SCRIPT", "FLUSH"), ("HDEL", "cache:x:ab", "f"),
    ("JSON.DEL", f"session:{{{SID}}}"), ("FT.AGGREGATE", "idx:kb", "*"), ("SORT", "rq:workers"),
    ("RENAME", "rq:a", "rq:b"), ("PUBLISH", "elsewhere", "x"), ("GET", "sessionX"),
])
def test_the_limited_user_is_refused_everything_else(
    limited: Settings, command: tuple[str, ...]
) -> None:
    conn = redis.Redis.from_url(limited.redis_url or "")
    with pytest.raises(redis.exceptions.NoPermissionError):
        conn.execute_command(*command)  # type: ignore[no-untyped-call]
    conn.close()


def test_anonymous_access_is_off(acl_redis: int) -> None:
    conn = redis.Redis(port=acl_redis)
    with pytest.raises(redis.AuthenticationError):
        conn.get("session:{x}")
    conn.close()
