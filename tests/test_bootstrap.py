"""Start-up names an eviction policy that can drop unpersisted sessions."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis

from app.settings import Settings
from app.stack.bootstrap import eviction_warning, prepare


@pytest.fixture
def policy(r: redis.Redis) -> Iterator[redis.Redis]:
    before = str(r.config_get("maxmemory-policy")["maxmemory-policy"])
    yield r
    r.config_set("maxmemory-policy", before)


def test_noeviction_raises_no_warning(policy: redis.Redis) -> None:
    policy.config_set("maxmemory-policy", "noeviction")
    assert eviction_warning(policy) is None


@pytest.mark.parametrize("name", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
def test_an_evicting_policy_is_warned_about_naming_the_setting_at_start(
    policy: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    policy.config_set("maxmemory-policy", name)
    with caplog.at_level(logging.WARNING, logger="backbone.bootstrap"):
        prepared = prepare(settings)
    assert len(prepared.warnings) == 1
    assert "maxmemory-policy" in prepared.warnings[0] and name in prepared.warnings[0]
    assert any("maxmemory-policy" in rec.getMessage() for rec in caplog.records)
