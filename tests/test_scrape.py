"""A scrape's cost does not grow with the keyspace, and /metrics is not public (#23, item 2).

Before: each /metrics walked the whole keyspace with `SCAN MATCH cache-stats:*`,
and /v1/cache/stats did two such walks per call: at 200k keys one of each made
603 SCAN calls, and anyone could ask.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from starlette.testclient import TestClient

from app.api import create_app
from app.settings import Settings
from app.stores import keys

Headers = Callable[[str], dict[str, str]]
NOISE = 200_000
LOOPBACK = ("127.0.0.1", 50000)
OUTSIDE = ("203.0.113.9", 50000)  # TEST-NET-3: an address from elsewhere


def calls(r: redis.Redis, command: str) -> int:
    stats = r.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


@pytest.fixture
def noise(r: redis.Redis) -> Iterator[None]:
    """NOISE keys that have nothing to do with the backbone."""
    prefix = f"noise-{uuid.uuid4().hex[:8]}:"
    names = [f"{prefix}{i}" for i in range(NOISE)]
    for start in range(0, NOISE, 5000):
        r.mset(dict.fromkeys(names[start:start + 5000], "x"))
    yield
    for start in range(0, NOISE, 5000):
        r.unlink(*names[start:start + 5000])


def test_a_scrape_and_a_cache_report_send_no_scan_over_200k_unrelated_keys(
    settings: Settings, r: redis.Redis, noise: None, token_for: Headers, user: str
) -> None:
    r.hincrby(keys.cache_stats("kb_search"), "lookups", 0)  # a tool with counters
    with TestClient(create_app(settings), client=LOOPBACK) as client:
        before = calls(r, "scan")
        scraped = client.get("/metrics")
        report = client.get("/v1/cache/stats", headers=token_for(user))
        after = calls(r, "scan")
    assert scraped.status_code == 200 and report.status_code == 200
    assert 'backbone_cache_lookups_total{tool="kb_search"}' in scraped.text
    assert "kb_search" in report.json()["tools"]
    assert after - before == 0


def test_a_tool_listed_in_cache_tools_is_scraped_and_reported(
    settings: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    tool = f"t_{uuid.uuid4().hex[:12]}"  # not in the registry
    r.hset(keys.cache_stats(tool), mapping={"lookups": 5, "hits": 2})
    r.sadd(keys.CACHE_TOOLS, tool)
    try:
        with TestClient(create_app(settings), client=LOOPBACK) as client:
            scraped = client.get("/metrics").text
            row = client.get("/v1/cache/stats", headers=token_for(user)).json()["tools"][tool]
        assert f'backbone_cache_lookups_total{{tool="{tool}"}} 5.0' in scraped
        assert row["lookups"] == 5 and row["hits"] == 2
    finally:
        r.delete(keys.cache_stats(tool))
        r.srem(keys.CACHE_TOOLS, tool)


def test_the_cache_report_is_computed_at_most_once_a_second_per_node(
    settings: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    h = token_for(user)
    with TestClient(create_app(settings)) as client:
        first = calls(r, "smembers")
        for _ in range(20):
            assert client.get("/v1/cache/stats", headers=h).status_code == 200
        # One report read `cache-tools` (about a second of calls may make a second one).
        assert 1 <= calls(r, "smembers") - first <= 2


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_without_a_metrics_token_a_loopback_caller_is_answered(
    settings: Settings, host: str
) -> None:
    with TestClient(create_app(settings), client=(host, 50000)) as client:
        assert client.get("/metrics").status_code == 200


def test_without_a_metrics_token_a_caller_from_elsewhere_is_refused(settings: Settings) -> None:
    with TestClient(create_app(settings), client=OUTSIDE) as client:
        res = client.get("/metrics")
    assert res.status_code == 403
    assert res.json()["error"]["code"] == "metrics_forbidden"
    assert "METRICS_TOKEN" in res.json()["error"]["message"]


@pytest.mark.parametrize("where", [LOOPBACK, OUTSIDE])
def test_with_a_metrics_token_only_its_bearer_is_answered(
    settings: Settings, where: tuple[str, int], token_for: Headers, user: str
) -> None:
    token = "scrape-" + uuid.uuid4().hex
    with TestClient(create_app(dataclasses.replace(settings, metrics_token=token)),
                    client=where) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # A user's token is no scrape token; nor is the right one with another case.
        assert client.get("/metrics", headers=token_for(user)).status_code == 401
        upper = {"Authorization": f"Bearer {token.upper()}"}
        assert client.get("/metrics", headers=upper).status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    assert "backbone_persist_lag_seconds" in ok.text
