"""The quality bench measures the live cache: same store, same lookup, same decision.

`bench/cache_quality.py` stores and looks up through `SemanticCache.probe`; the app
looks up through `SemanticCache.lookup`. Here a sample of labelled pairs goes both
ways against the real Redis Stack and the real model, and every pair must come
out the same, so a figure in docs/cache-quality.md is a figure of what the app serves.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from app.cache.decision import HitPolicy
from app.cache.semantic import SemanticCache
from app.embeddings import shared_embedder
from app.settings import Settings
from app.stores.clients import async_redis_client
from app.tools.base import ToolContext, ToolResult

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "qqp-sample.jsonl"


def _bench() -> ModuleType:
    path = ROOT / "bench" / "cache_quality.py"
    spec = importlib.util.spec_from_file_location("cache_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cache_quality"] = module
    spec.loader.exec_module(module)
    return module


def test_the_live_cache_serves_exactly_the_pairs_the_quality_bench_counts_as_hits(
    settings: Settings, user: str
) -> None:
    bench = _bench()
    pairs = bench.load_pairs(SAMPLE)
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    vectors = dict(zip(texts, shared_embedder().embed_many(texts), strict=True))
    measured, live = f"qb_{uuid.uuid4().hex[:10]}", f"ql_{uuid.uuid4().hex[:10]}"

    async def main() -> tuple[list[Any], list[bool]]:
        client = async_redis_client(settings.redis_url or "")
        try:
            found = await bench.through_cache(client, settings, {measured: pairs}, vectors,
                                              user=user)
            # The app's side: its own store, then `lookup`, one question at a time.
            cache = SemanticCache(client, settings)
            tool, ctx = bench.SplitTool(live), ToolContext(user)
            for a in sorted({p.a for p in pairs}):
                await cache.store(tool, {"query": a}, a, vectors[a], ctx, ToolResult(a), 1.0)
            served = [
                await cache.lookup(tool, {"query": p.b}, p.b, vectors[p.b], ctx) is not None
                for p in pairs
            ]
            await cache.drain()
            return found[measured], served
        finally:
            await client.aclose()

    found, served = asyncio.run(main())
    differ = [(lk.pair.b, lk.nearest, lk.distance, lk.reason)
              for lk, hit in zip(found, served, strict=True) if lk.served != hit]
    assert differ == []
    # The tables replay the decision over the same candidates: at the default, the same.
    replayed = bench.hits(bench.features(found, None), HitPolicy())
    assert [bool(h) for h in replayed] == served
    # The sample exercises the decision: hits, and near candidates each check vetoes.
    reasons = [lk.reason for lk in found]
    assert 10 <= sum(served) < len(pairs)
    assert {"low combined score", "distance"} <= set(reasons)
    assert len({"numbers differ", "negation differs", "entities differ"} & set(reasons)) >= 2
    # What `decide` judged is a stored question as its asker wrote it, not a folded copy.
    assert {lk.nearest for lk in found} <= {p.a for p in pairs}
