"""One app node of the single-flight test (tests/test_single_flight.py), as its own process.

    python tests/flight_node.py REDIS_URL SEARXNG_URL GO_FILE N QUESTION...

Builds what the app builds for a tool call (its own Redis client, SemanticCache,
ToolRouter, web_search against the stand-in engine), prints `ready`, waits for
GO_FILE, then runs N calls at once, cycling through the QUESTION variants, and
prints one JSON line: per call, whether it was cached and the result's URLs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from app.cache.semantic import SemanticCache
from app.chat.tool_router import ToolRouter
from app.embeddings import shared_embedder
from app.llm.base import ToolCall
from app.settings import Settings
from app.stores.clients import async_redis_client
from app.tools import ToolContext, WebSearch


async def node(redis_url: str, searx: str, go: Path, n: int, questions: list[str]) -> None:
    settings = dataclasses.replace(Settings.from_env(), redis_url=redis_url)
    embedder = shared_embedder()
    embedder.warm()
    for q in questions:  # the model's cost is not what this test is about
        await embedder.aembed(q)
    client = async_redis_client(redis_url)
    cache = SemanticCache(client, settings, embedder=embedder)
    router = ToolRouter({"web_search": WebSearch(searx, timeout=10)}, embedder, 10.0, cache=cache)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    calls = [
        ToolCall(id=f"c{i}", name="web_search", arguments={"query": questions[i % len(questions)]})
        for i in range(n)
    ]
    done = await asyncio.gather(*(router.run(c, ToolContext(f"user-{i}")) for i, c in
                                  enumerate(calls)))  # fmt: skip
    await cache.drain()
    await client.aclose()
    print(json.dumps([{"cached": d.cached, "urls": [i["url"] for i in d.result.items],
                       "error": d.result.error} for d in done]), flush=True)  # fmt: skip


if __name__ == "__main__":
    url, searx, go, n, *questions = sys.argv[1:]
    asyncio.run(node(url, searx, Path(go), int(n), questions))
