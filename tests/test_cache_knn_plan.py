"""The cache KNN's plan follows what its filter selects, and no plan serves another scope.

One index of the cache's own schema, under its own name and prefix, holds 10,000
entries of one tool: 9,999 in the scope `user:crowd` and 1 in `user:lonely`.
Each test runs the production query (`knn_command`) on the real Redis Stack.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from redisvl.index import SearchIndex
from redisvl.schema import IndexSchema
from test_case_isolation import wait_indexed
from test_semantic_cache import CountingEmbedder, CountingTool

from app.cache.knn import (
    ADHOC_MAX,
    EF_RUNTIME,
    KNN_BATCH_SIZE,
    QueryCounts,
    knn_command,
    knn_filter,
    knn_plan,
)
from app.cache.semantic import SemanticCache, args_digest
from app.embeddings import shared_embedder
from app.settings import Settings
from app.stores import indexes
from app.stores.clients import async_redis_client, redis_client
from app.tools.base import ToolContext
from app.tools.kb_search import parse_search_reply

ENTRIES = 10_000
DIMS = 384
CROWD, LONELY = "user:crowd", "user:lonely"
# The counts a plan is chosen from: (selected, indexed); None is RediSearch's own choice.
PLANS: dict[str, tuple[int | None, int | None]] = {
    "planner": (None, None),
    "scan": (1, ENTRIES),
    "batches": (ENTRIES - 1, ENTRIES),
}


class Crowd:
    def __init__(self, index: str, prefix: str, vectors: np.ndarray[Any, Any]) -> None:
        self.index, self.prefix, self.vectors = index, prefix, vectors
        self.owner = CountingTool(scope="user")  # the tool the entries belong to
        self.tool = self.owner.spec.name

    def key(self, i: int) -> str:
        return f"{self.prefix}{i}"

    @property
    def lonely_key(self) -> str:
        return self.key(ENTRIES - 1)

    def nearest(self, scope: str, v: np.ndarray[Any, Any], plan: str, r: redis.Redis) -> str:
        command = knn_command(self.index, self.tool, scope, v, *PLANS[plan])
        _, rows = parse_search_reply(r.execute_command(*command))  # type: ignore[no-untyped-call]
        assert all(f["scope"] == scope for _, f in rows)
        return rows[0][0] if rows else ""


MODEL = shared_embedder().model_id  # what the cache's KNN filters on
QUERY_ONLY = args_digest({})  # and the digest of a query-only call's other arguments


@pytest.fixture(scope="module")
def crowd(settings: Settings) -> Iterator[Crowd]:
    r = redis_client(settings.redis_url or "")
    tag = uuid.uuid4().hex[:8]
    spec = indexes.schema("cache").to_dict()
    spec["index"]["name"] = index = f"idx:test-knnplan-{tag}"
    spec["index"]["prefix"] = prefix = f"knnplan-{tag}:"
    SearchIndex(IndexSchema.from_dict(spec), redis_client=r).create()
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((ENTRIES, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = Crowd(index, prefix, vectors)
    pipe = r.pipeline(transaction=False)
    for i, v in enumerate(vectors):
        pipe.hset(out.key(i), mapping={
            "tool": out.tool, "scope": LONELY if i == ENTRIES - 1 else CROWD,
            "query": f"question {i}", "created_at": i, "embedding": v.tobytes(),
            "result": '{"content": "c", "items": []}', "tool_ms": 1.0,
            "model": MODEL, "args_digest": QUERY_ONLY,
        })  # fmt: skip
    pipe.execute()
    try:
        wait_indexed(r, index, ENTRIES, timeout=120.0)
        yield out
    finally:
        r.ft(index).dropindex(delete_documents=True)
        r.close()


def test_the_plan_scans_a_small_selection_and_batches_a_large_one_sized_to_its_index() -> None:
    assert "HYBRID_POLICY" not in knn_plan(None, None)  # not counted yet: RediSearch chooses
    assert knn_plan(1, 100_000) == knn_plan(ADHOC_MAX, 100_000) == "HYBRID_POLICY ADHOC_BF"
    batches = f"HYBRID_POLICY BATCHES BATCH_SIZE {KNN_BATCH_SIZE}"
    assert knn_plan(ADHOC_MAX + 1, 10_000) == f"EF_RUNTIME {KNN_BATCH_SIZE} {batches}"
    assert knn_plan(30_000, 30_000) == f"EF_RUNTIME 120 {batches}"
    assert knn_plan(5_000, 100_000) == f"EF_RUNTIME {EF_RUNTIME} {batches}"
    assert knn_plan(5_000, None) == f"EF_RUNTIME {EF_RUNTIME} {batches}"


def test_redisearch_runs_the_plan_the_counts_chose(crowd: Crowd, r: redis.Redis) -> None:
    def profile(scope: str, plan: str) -> str:
        command = knn_command(crowd.index, crowd.tool, scope, crowd.vectors[0], *PLANS[plan])
        reply = r.execute_command("FT.PROFILE", crowd.index, "SEARCH", "QUERY", *command[2:])  # type: ignore[no-untyped-call]
        return str(reply)

    assert "Batches number" in profile(CROWD, "batches")
    assert "Batches number" not in profile(LONELY, "scan")


@pytest.mark.parametrize("plan", PLANS)
def test_a_scope_holding_1_of_10k_entries_finds_its_own_and_never_anothers(
    crowd: Crowd, r: redis.Redis, plan: str
) -> None:
    # Asked with a crowd entry's own vector: 9,999 entries of another scope are nearer.
    # "batches" is a stale count (the scope once held many): a plan for speed only.
    for i in (0, 4_321, 9_998):
        assert crowd.nearest(LONELY, crowd.vectors[i], plan, r) == crowd.lonely_key


@pytest.mark.parametrize("plan", PLANS)
def test_a_scope_holding_9999_of_10k_entries_finds_its_true_nearest(
    crowd: Crowd, r: redis.Redis, plan: str
) -> None:
    rng = np.random.default_rng(11)
    own = crowd.vectors[: ENTRIES - 1]
    picks = rng.integers(0, ENTRIES - 1, 20)
    queries = own[picks] + rng.normal(0, 0.012, (20, DIMS)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = [crowd.key(int(np.argmax(own @ q))) for q in queries]
    found = [crowd.nearest(CROWD, q, plan, r) for q in queries]
    # HNSW is approximate: bench/cache_lookup.py measures recall@1 1.000 at 10k.
    assert sum(a == b for a, b in zip(found, truth, strict=True)) >= 19


def test_the_cache_counts_each_filter_in_the_background_once_per_interval(
    crowd: Crowd, settings: Settings
) -> None:
    async def main() -> tuple[list[int | None], list[int | None], int]:
        client = async_redis_client(settings.redis_url or "")
        spawned: list[asyncio.Task[None]] = []
        counts = QueryCounts(client, crowd.index, lambda c: spawned.append(asyncio.create_task(c)))
        queries = [knn_filter(crowd.tool, CROWD), knn_filter(crowd.tool, LONELY), "*"]
        try:
            before = [counts.count(q) for q in queries]
            await asyncio.gather(*spawned)
            after = [counts.count(q) for q in queries]
            return before, after, len(spawned)
        finally:
            await client.aclose()

    before, after, spawned = asyncio.run(main())
    assert before == [None, None, None]
    assert after == [ENTRIES - 1, 1, ENTRIES]
    assert spawned == 3  # the second round found its counts fresh


def test_a_failed_count_leaves_the_plan_to_redisearch(settings: Settings) -> None:
    async def main() -> int | None:
        client = async_redis_client(settings.redis_url or "")
        spawned: list[asyncio.Task[None]] = []
        counts = QueryCounts(
            client, "idx:no-such-index", lambda c: spawned.append(asyncio.create_task(c))
        )
        try:
            counts.count("*")
            await asyncio.gather(*spawned)
            return counts.count("*")
        finally:
            await client.aclose()

    assert asyncio.run(main()) is None


def test_a_lookup_in_the_lonely_scope_judges_its_own_entry_before_and_after_the_counts(
    crowd: Crowd, settings: Settings
) -> None:
    ctx = ToolContext("lonely")

    async def main() -> list[str | None]:
        client = async_redis_client(settings.redis_url or "")
        cache = SemanticCache(client, settings, None, index=crowd.index,
                              embedder=CountingEmbedder())  # fmt: skip
        try:
            keys = []
            for _ in range(2):  # the first before any count, the second with them
                found = await cache.probe(crowd.owner, {"query": "q"}, "q", crowd.vectors[0], ctx)
                keys.append(found.key if found is not None else None)
                await cache.drain()
            plan = knn_plan(cache.counts.count(knn_filter(crowd.tool, LONELY, MODEL, QUERY_ONLY)),
                             ENTRIES)
            assert plan == "HYBRID_POLICY ADHOC_BF"
            return keys
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [crowd.lonely_key, crowd.lonely_key]
