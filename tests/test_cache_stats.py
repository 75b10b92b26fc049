"""The cache stats report's threshold: the audited bound, else the tool's policy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any, cast

import redis
from starlette.testclient import TestClient

from app.cache.decision import FITTED_MAX_DISTANCE, AdaptiveThreshold
from app.cache.semantic import threshold_key
from app.cache.stats import builtin_policies, cache_stats
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client
from app.tools import CachePolicy, KbSearch

Headers = Callable[[str], dict[str, str]]


def report(settings: Settings, policies: Mapping[str, CachePolicy] | None) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        client = async_redis_client(settings.redis_url or "")
        try:
            return await cache_stats(client, None, policies)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_tool_no_audit_has_moved_reports_its_policy_threshold(
    settings: Settings, r: redis.Redis
) -> None:
    tool = f"t_{uuid.uuid4().hex[:12]}"
    r.hset(keys.cache_stats(tool), mapping={"lookups": 3, "misses": 3})
    r.sadd(keys.CACHE_TOOLS, tool)  # as every counter write does
    try:
        row = report(settings, {tool: CachePolicy(0.15, 60, "user")})[tool]
        assert row["threshold"] == 0.15 and row["audits"] == 0
        assert report(settings, {})[tool]["threshold"] is None  # no policy, no audit
    finally:
        r.delete(keys.cache_stats(tool))
        r.srem(keys.CACHE_TOOLS, tool)


def test_an_audited_threshold_wins_over_the_policy(settings: Settings, r: redis.Redis) -> None:
    tool = f"t_{uuid.uuid4().hex[:12]}"
    r.hset(threshold_key(tool), "max_distance", "0.0812")  # the other fields default
    r.sadd(keys.CACHE_TOOLS, tool)  # as the audit that moved it does
    try:
        assert report(settings, {tool: CachePolicy(0.15, 60, "user")})[tool]["threshold"] == 0.0812
    finally:
        r.delete(threshold_key(tool))
        r.srem(keys.CACHE_TOOLS, tool)


def test_the_shipped_tools_policies_are_the_default() -> None:
    policies = builtin_policies()
    assert set(policies) == {"kb_search", "web_search"}
    assert all(p.max_distance == FITTED_MAX_DISTANCE for p in policies.values())


def test_the_stats_route_never_shows_a_null_threshold_for_kb_search(
    client: TestClient, token_for: Headers, user: str, r: redis.Redis
) -> None:
    r.hsetnx(keys.cache_stats("kb_search"), "lookups", 0)  # listed even in a fresh store
    audited = cast(Mapping[bytes, bytes], r.hgetall(threshold_key("kb_search")))
    expected = AdaptiveThreshold.from_dict(audited).max_distance if audited else None
    assert KbSearch.policy is not None
    row = client.get("/v1/cache/stats", headers=token_for(user)).json()["tools"]["kb_search"]
    assert row["threshold"] == round(expected or KbSearch.policy.max_distance, 4)
