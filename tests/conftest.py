"""Real Redis Stack and real PostgreSQL for the whole test session.

`REDIS_URL` / `DATABASE_URL` win when set; otherwise the embedded launcher the
app itself uses starts both under a temporary folder on a free port. Tests
isolate by fresh ids and key prefixes, never by DB number or FLUSHALL.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from app.bootstrap import prepare
from app.embedded import EmbeddedStack, free_port
from app.settings import Settings
from app.stores import redis_client


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = dataclasses.replace(
        Settings.from_env(),
        data_dir=tmp_path_factory.mktemp("data"),
        auth_secret="test-secret-with-enough-bytes-for-hs256",
        port=free_port(),
    )
    stack = EmbeddedStack(base, redis_port=free_port())
    resolved = stack.start()
    prepare(resolved)
    yield resolved
    stack.stop()


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = redis_client(settings.redis_url or "")
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
    return settings
