"""Concurrent misses for one call, on any node, run the tool once (`app.cache.flight`).

Two app nodes are two real processes (tests/flight_node.py), each with its own Redis
client, cache and router, sharing the test's Redis; the web-search engine is the local
stand-in, answering after half a second like a real one, and counting its queries.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from fakes import FakeSearxng, searx_result
from test_semantic_cache import CountingEmbedder

from app.cache.semantic import SemanticCache
from app.cache.stats import cache_stats
from app.chat.tool_router import Routed, ToolRouter
from app.llm.base import ToolCall
from app.settings import Settings
from app.stores.clients import async_redis_client
from app.tools import ToolContext, WebSearch

ROOT = Path(__file__).resolve().parent.parent


def test_twenty_concurrent_misses_over_two_app_processes_run_the_search_once(
    settings: Settings, tmp_path: Path,
) -> None:
    place = f"Hvaler{uuid.uuid4().hex[:6]}"
    # Near-identical (same canonical text): one entry, one flight.
    variants = [f"When does the {place} night ferry leave?",
                f"  when does the {place.upper()} night ferry LEAVE "]  # fmt: skip
    fake = FakeSearxng([searx_result(f"https://example.org/{place}", "Ferry", "At 23:10.")],
                       delay=0.5)  # fmt: skip
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = _flight_hits(settings)
    with fake.serve() as base:
        nodes = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "flight_node.py"), settings.redis_url or "",
                 base, str(go), "10", *variants],
                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )
            for _ in range(2)
        ]
        try:
            for p in nodes:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            go.touch()
            outputs = [p.communicate(timeout=60)[0] for p in nodes]
        finally:
            for p in nodes:
                if p.poll() is None:
                    p.kill()
    assert [p.returncode for p in nodes] == [0, 0]
    calls = [c for out in outputs for c in json.loads(out.strip().splitlines()[-1])]
    assert len(calls) == 20 and all(c["error"] is None for c in calls)
    assert len(fake.queries) == 1  # one execution for twenty calls on two nodes
    assert all(c["urls"] == [f"https://example.org/{place}"] for c in calls)
    assert sum(not c["cached"] for c in calls) == 1
    # Callers that waited on the leader are counted, and `cache stats` shows them.
    assert _flight_hits(settings) - before >= 1


def _flight_hits(settings: Settings) -> int:
    async def read() -> int:
        client = async_redis_client(settings.redis_url or "")
        try:
            return int((await cache_stats(client, None)).get("web_search", {}).get(
                "flight_hits", 0))
        finally:
            await client.aclose()

    return asyncio.run(read())


def route_at_once(settings: Settings, tool: WebSearch, n: int, question: str) -> list[Routed]:
    emb = CountingEmbedder()

    async def main() -> list[Routed]:
        client = async_redis_client(settings.redis_url or "")
        try:
            cache = SemanticCache(client, settings, embedder=emb)
            router = ToolRouter({"web_search": tool}, emb, 4.0, cache=cache)
            calls = [ToolCall(id=f"c{i}", name="web_search", arguments={"query": question})
                     for i in range(n)]  # fmt: skip
            out = await asyncio.gather(*(router.run(c, ToolContext("u")) for c in calls))
            await cache.drain()
            return list(out)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_when_the_leaders_run_fails_the_waiters_run_the_tool_themselves(
    settings: Settings,
) -> None:
    from fakes import Failure

    fake = FakeSearxng(delay=0.2)
    fake.failure = Failure(502, {"error": "upstream down"})
    with fake.serve() as base:
        got = route_at_once(settings, WebSearch(base, timeout=4), 5,
                            f"Is the {uuid.uuid4().hex[:8]} bridge open?")  # fmt: skip
    # Nothing was stored, so nobody is served a result; each ran the search itself
    # (no waiter sat out its whole bound: the leader's lock was released at once).
    assert all(r.result.error is not None and not r.cached for r in got)
    assert len(fake.queries) == 5
    assert max(r.elapsed_ms for r in got) < 2000
