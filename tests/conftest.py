"""Real Redis Stack and real PostgreSQL for the whole test session.

`REDIS_URL` / `DATABASE_URL` win when set; otherwise the embedded launcher the
app itself uses starts both under a temporary folder on a free port. Tests
isolate by fresh ids and key prefixes, never by DB number or FLUSHALL.

Two topologies for the session plane: `single` (everything on the one Redis,
the default) and `cluster` (SESSION_REDIS_URL on an embedded 3-primary,
3-replica Redis Cluster, started once, on first use). A module runs on both with

    pytestmark = BOTH_TOPOLOGIES

and reaches session keys through `sr` (the session-plane client), search keys
through `r`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import AsyncConnectionPool
from starlette.testclient import TestClient

from app.api import create_app
from app.sessions.store import Sessions
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.cluster import EmbeddedCluster
from app.stack.embedded import EmbeddedStack, free_port
from app.stores.clients import async_session_redis_client, redis_client, session_redis_client


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temp folder outside pytest's basetemp. Run as root, pgserver runs PostgreSQL
    as the user `pgserver`, which must traverse the path; pytest keeps its own
    `pytest-of-<user>` at mode 0700 and resets it whenever another session starts."""
    path = Path(tempfile.mkdtemp(prefix=f"backbone-{prefix}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    with scratch("test") as path:
        yield path


TOPOLOGIES = ["single", "cluster"]
# `pytestmark = BOTH_TOPOLOGIES`: the module runs once per session-plane topology.
BOTH_TOPOLOGIES = pytest.mark.parametrize("topology", TOPOLOGIES, indirect=True, scope="module")


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    with scratch("session") as data_dir:
        yield from _stack(data_dir)


@pytest.fixture(scope="session")
def session_cluster() -> Iterator[EmbeddedCluster]:
    """The embedded cluster, shared by every cluster-topology module."""
    with scratch("cluster") as data_dir:
        cluster = EmbeddedCluster(data_dir)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def topology(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="module")
def settings(
    stack_settings: Settings, topology: str, request: pytest.FixtureRequest
) -> Settings:
    if topology == "single":
        return stack_settings
    cluster: EmbeddedCluster = request.getfixturevalue("session_cluster")
    return dataclasses.replace(
        stack_settings, session_redis_url=cluster.url, session_redis_cluster=True
    )


def _stack(data_dir: Path) -> Iterator[Settings]:
    base = dataclasses.replace(
        Settings.from_env(),
        data_dir=data_dir,
        auth_secret="test-secret-with-enough-bytes-for-hs256",
        port=free_port(),
    )
    stack = EmbeddedStack(base, redis_port=free_port())
    resolved = stack.start()
    try:
        prepare(resolved)
        yield resolved
    finally:
        stack.stop()


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = redis_client(settings.redis_url or "")
    yield client
    client.close()


@pytest.fixture
def sr(settings: Settings) -> Iterator[redis.Redis]:
    """The session-plane client (a cluster client on the cluster topology)."""
    client = session_redis_client(settings)
    yield client
    client.close()


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def token_for(settings: Settings) -> Callable[[str], dict[str, str]]:
    """Authorization headers for a user."""
    from app.auth import issue_token

    def headers(user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(settings.auth_secret or '', user)}"}

    return headers


@pytest.fixture
def user() -> str:
    """A fresh user id per test, so tests never see each other's sessions."""
    return f"u-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def stores_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Jobs read their settings from the environment, as in a real worker."""
    monkeypatch.setenv("REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("DATABASE_URL", settings.database_url or "")
    if settings.session_redis_url:
        monkeypatch.setenv("SESSION_REDIS_URL", settings.session_redis_url)
        monkeypatch.setenv("SESSION_REDIS_CLUSTER", "1" if settings.session_redis_cluster else "0")
    return settings


@pytest.fixture
async def session_store(settings: Settings) -> AsyncIterator[Sessions]:
    """The app's session store on its own async clients."""
    client = async_session_redis_client(settings)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=8, open=False,
        kwargs={"autocommit": True},
    )
    await pool.open()
    yield Sessions(client, pool, settings.session_ttl_seconds,
                   wait_replicas=settings.session_wait_replicas,
                   wait_timeout_ms=settings.session_redis_wait_timeout_ms)
    await pool.close()
    await client.aclose()


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    """The app in-process, the offline provider at full speed."""
    fast = dataclasses.replace(settings, offline_token_delay_ms=0)
    with TestClient(create_app(fast)) as c:
        yield c


@pytest.fixture(scope="module")
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


@pytest.fixture
def sdk(settings: Settings) -> Iterator[Any]:
    """`sdk(base, user)`: the official openai SDK aimed at a server, as that user
    (tests/openai_support.py); every client is closed after the test."""
    from openai_support import Clients

    clients = Clients(settings)
    yield clients
    clients.close()
