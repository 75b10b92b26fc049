"""The least-privilege Redis user of deploy/redis/users.acl (used by compose.yaml)
runs the whole app and its workers, and nothing else."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.api import create_app
from app.bootstrap import prepare
from app.embedded import EmbeddedRedis, free_port
from app.settings import Settings

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
def limited(settings: Settings, acl_redis: int, monkeypatch: pytest.MonkeyPatch) -> Settings:
    url = f"redis://backbone:{_password('backbone')}@127.0.0.1:{acl_redis}/0"
    monkeypatch.setenv("REDIS_URL", url)  # the jobs read it, as in a worker
    monkeypatch.setenv("DATABASE_URL", settings.database_url or "")
    s = dataclasses.replace(settings, redis_url=url, offline_token_delay_ms=0)
    prepare(s)  # modules (probed: MODULE LIST is denied), indexes, scripts
    return s


def test_the_app_and_its_jobs_run_as_the_limited_user(
    limited: Settings, token_for: Headers, user: str
) -> None:
    with TestClient(create_app(limited)) as c:
        assert c.get("/readyz").json()["checks"]["redis_modules"] is True
        h = token_for(user)
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                      json={"content": "I live in Lisbon. How does AOF work?"}) as res:
            assert frames(res.iter_lines())[-1].event == "message.done"
    conn = redis.Redis.from_url(limited.redis_url or "")
    wait_until(lambda: Queue("memory", connection=conn).count >= 1, "the extraction job")
    for name in ("memory", "persist"):
        q = Queue(name, connection=conn)
        if name == "persist":
            q.enqueue("workers.jobs.sweep_unpersisted", 0.0)
        SimpleWorker([q], connection=conn).work(burst=True)
        assert q.failed_job_registry.count == 0, f"a {name} job failed under the ACL"
    conn.close()


@pytest.mark.parametrize("command", [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "dir"), ("KEYS", "*"),
    ("SET", "elsewhere", "1"), ("ACL", "SETUSER", "intruder", "on"), ("SHUTDOWN",),
])
def test_the_limited_user_is_refused_everything_else(
    limited: Settings, command: tuple[str, ...]
) -> None:
    conn = redis.Redis.from_url(limited.redis_url or "")
    with pytest.raises(redis.exceptions.NoPermissionError):
        conn.execute_command(*command)
    conn.close()


def test_anonymous_access_is_off(acl_redis: int) -> None:
    conn = redis.Redis(port=acl_redis)
    with pytest.raises(redis.AuthenticationError):
        conn.get("session:{x}")
    conn.close()
