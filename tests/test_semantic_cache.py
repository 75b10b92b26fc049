"""The semantic cache behind the tool router, against the real Redis Stack and the real model.

Each test uses its own tool name (the cache's TAG filter and key prefix), so
tests never see each other's entries. The tool is a small test double of a
*tool*, the project's plug-in point; Redis and the model are real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import redis
from fakes import FakeSearxng, searx_result

from app.cache.decision import HitPolicy
from app.cache.semantic import Probe, SemanticCache, entry_key, threshold_key
from app.cache.stats import cache_stats, clear_cache
from app.chat.tool_router import Routed, ToolRouter
from app.embeddings import Embedder, Vector, shared_embedder
from app.llm.base import ToolCall, ToolSpec
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client
from app.tools import WebSearch
from app.tools.base import (
    QUERY_PARAMETERS,
    CachePolicy,
    Tool,
    ToolContext,
    ToolResult,
    check_query,
    query_text_of,
)

Scope = Any  # Literal["global", "tenant", "user"], kept loose for the test double


class CountingTool:
    """Answers with ids that name the caller and the run number; counts its runs."""

    def __init__(self, scope: Scope = "user", ttl: int = 600, max_distance: float = 0.12) -> None:
        self.spec = ToolSpec(f"t_{uuid.uuid4().hex[:12]}", "test tool", QUERY_PARAMETERS)
        self.policy: CachePolicy | None = CachePolicy(max_distance, ttl, scope)
        self.runs = 0
        self.version = 1

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        self.runs += 1
        query = check_query(arguments)
        ids = [f"doc-{ctx.user_id}-v{self.version}-{i}" for i in range(3)]
        items = [{"id": i, "title": i, "text": query, "url": None, "score": 1.0} for i in ids]
        return ToolResult(f"{self.spec.name} answer for {ctx.user_id}: {query}", items)


class CountingEmbedder(Embedder):
    def __init__(self) -> None:
        self.inner = shared_embedder()
        self.calls = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def embed(self, text: str) -> Vector:
        self.calls += 1
        return self.inner.embed(text)

    async def aembed(self, text: str) -> Vector:
        self.calls += 1
        return await self.inner.aembed(text)


Calls = list[tuple[str, str]]  # (user, question)


def ask(
    settings: Settings, tool: Tool, calls: Calls,
    enqueue: Callable[[dict[str, Any]], None] | None = None,
    embedder: CountingEmbedder | None = None, base_policy: HitPolicy | None = None,
) -> list[Routed]:
    """Route each (user, question) through one ToolRouter + SemanticCache, in order."""
    emb = embedder or CountingEmbedder()

    async def main() -> list[Routed]:
        client = async_redis_client(settings.redis_url or "")
        try:
            cache = SemanticCache(client, settings, enqueue, embedder=emb,
                                  base_policy=base_policy)
            router = ToolRouter({tool.spec.name: tool}, emb, 30.0, cache=cache)
            out = []
            for i, (user, question) in enumerate(calls):
                call = ToolCall(id=f"c{i}", name=tool.spec.name, arguments={"query": question})
                out.append(await router.run(call, ToolContext(user)))
            await cache.drain()  # counters and audit enqueues run in the background
            return out
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_reworded_question_is_served_from_the_cache_without_running_the_tool(
    settings: Settings, user: str
) -> None:
    tool = CountingTool()
    first, second = ask(settings, tool, [
        (user, "How do I reset my password?"),
        (user, "How can I reset my password?"),
    ])  # fmt: skip
    assert not first.cached and second.cached
    assert tool.runs == 1
    assert second.result.content == first.result.content
    assert second.result.items == first.result.items
    assert second.distance is not None and 0 < second.distance <= 0.12
    assert second.saved_ms == first.tool_ms


def test_an_exact_repeat_is_served_without_embedding_the_query(
    settings: Settings, user: str
) -> None:
    tool, emb = CountingTool(), CountingEmbedder()
    routed = ask(settings, tool, [
        (user, "What is the default Redis port?"),
        (user, "  what is the DEFAULT redis port "),  # same canonical text
    ], embedder=emb)  # fmt: skip
    assert [r.cached for r in routed] == [False, True]
    assert routed[1].distance == 0.0
    assert emb.calls == 1 and tool.runs == 1


def test_arguments_equal_in_python_but_not_in_json_name_different_entries() -> None:
    # 1 == 1.0 == True in Python (so also as a memo's key); as tool arguments they differ.
    def key(flag: Any, query: str = "What is the default Redis port?") -> str:
        return entry_key("t", "global", {"query": query, "strict": flag}, query, model="m")

    assert len({key(1), key(True), key(1.0), key("1")}) == 4
    assert key(1) == key(1) and key([1]) == key([1]) != key(1)  # a list: not memoised, same
    assert key(1, "What is the DEFAULT Redis port") == key(1)  # the query's canonical text


def test_a_question_that_differs_only_in_a_number_is_not_a_hit(
    settings: Settings, user: str
) -> None:
    tool = CountingTool()
    routed = ask(settings, tool, [
        (user, "How many replicas does Redis need for 3 shards?"),
        (user, "How many replicas does Redis need for 5 shards?"),
    ])  # fmt: skip
    assert [r.cached for r in routed] == [False, False]
    assert tool.runs == 2


def test_an_entry_carries_the_tools_ttl_its_question_as_asked_its_vector_and_result(
    settings: Settings, r: redis.Redis, user: str
) -> None:
    tool = CountingTool(ttl=321)
    ask(settings, tool, [(user, "How long does Redis keep a key with a TTL?")])
    [key] = list(r.scan_iter(match=f"{keys.cache_prefix(tool.spec.name)}*"))
    assert 0 < r.ttl(key) <= 321
    fields = r.hgetall(key)
    assert fields[b"scope"] == f"user:{user}".encode()
    # The question as asked; only the key hash is made from its canonical text.
    assert fields[b"query"] == b"How long does Redis keep a key with a TTL?"
    assert len(fields[b"embedding"]) == 384 * 4
    assert b"result" in fields and float(fields[b"tool_ms"]) >= 0


def test_a_user_scoped_result_never_reaches_another_user_even_for_the_same_question(
    settings: Settings, user: str
) -> None:
    tool = CountingTool(scope="user")
    other = f"x.{user}@example-org.com"  # tag syntax in the id must stay data
    routed = ask(settings, tool, [
        (user, "Which of my files mention the budget?"),
        (other, "Which of my files mention the budget?"),
        # A rewording the fitted decision accepts (distance 0.04, reworded enough).
        (other, "Which of my files talk about the budget?"),
        (user, "Which of my files talk about the budget?"),
    ])  # fmt: skip
    assert [r.cached for r in routed] == [False, False, True, True]
    assert tool.runs == 2
    assert all(user in i["id"] for i in routed[0].result.items + routed[3].result.items)
    assert all(other in i["id"] for i in routed[1].result.items + routed[2].result.items)


def test_a_global_result_is_shared_by_every_user(settings: Settings, user: str) -> None:
    tool = CountingTool(scope="global")
    routed = ask(settings, tool, [
        (user, "What does the append-only file do?"),
        (f"{user}-b", "What does the append only file do?"),
    ])  # fmt: skip
    assert [r.cached for r in routed] == [False, True]
    assert routed[1].result.items == routed[0].result.items


def test_a_global_web_search_hit_never_shows_the_next_user_the_first_askers_wording(
    settings: Settings, user: str
) -> None:
    # A made-up ferry: no other test's global web_search entry is near this question.
    first_q = "When does the Tjarnvik night ferry leave pier 7?"
    second_q = "When does the Tjarnvik night ferry depart from pier 7?"
    fake = FakeSearxng([searx_result(
        "https://example.org/tjarnvik", "Tjarnvik ferry", "Night crossings sail from pier 7.")])
    with fake.serve() as base:
        first, second = ask(settings, WebSearch(base, timeout=5), [
            (user, first_q), (f"{user}-b", second_q)])  # fmt: skip
    assert not first.cached and second.cached and len(fake.queries) == 1
    assert second.result.items == first.result.items
    assert "Night crossings sail from pier 7." in second.result.content
    for words in (first_q, "Tjarnvik night ferry leave", "leave"):
        assert words not in second.result.content, words


def test_audit_rate_zero_never_enqueues_and_one_always_does(
    settings: Settings, user: str
) -> None:
    questions = [(user, "How do I rotate the API key?")] + [
        (user, "How can I rotate the API key?")
    ] * 4
    never: list[dict[str, Any]] = []
    ask(dataclasses.replace(settings, retrieval_cache_audit_rate=0.0), CountingTool(),
        questions, never.append)  # fmt: skip
    assert never == []
    always: list[dict[str, Any]] = []
    tool = CountingTool()
    ask(dataclasses.replace(settings, retrieval_cache_audit_rate=1.0), tool, questions,
        always.append)  # fmt: skip
    assert len(always) == 4
    job = always[0]
    assert job["tool"] == tool.spec.name and job["user_id"] == user
    assert job["entry_key"].startswith(keys.cache_prefix(tool.spec.name))
    assert job["arguments"] == {"query": "How can I rotate the API key?"}
    assert 0 < job["distance"] <= 0.12


def test_stats_count_lookups_and_hits_and_clear_removes_only_that_tools_entries(
    settings: Settings, r: redis.Redis, user: str
) -> None:
    tool, kept = CountingTool(), CountingTool()
    ask(settings, tool, [
        (user, "How do I reset my password?"),
        (user, "How can I reset my password?"),
        (user, "How do I reset my password?"),
        (user, "What is the capital of France?"),
    ])  # fmt: skip
    ask(settings, kept, [(user, "What is the capital of France?")])

    async def report() -> dict[str, dict[str, Any]]:
        client = async_redis_client(settings.redis_url or "")
        try:
            return await cache_stats(client, None)
        finally:
            await client.aclose()

    row = asyncio.run(report())[tool.spec.name]
    assert row["lookups"] == 4 and row["hits"] == 2 and row["exact_hits"] == 1
    assert row["misses"] == 2 and row["hit_rate"] == 0.5
    assert row["audits"] == 0 and row["mean_overlap"] is None and row["threshold"] is None
    assert clear_cache(r, tool.spec.name) == 2
    assert list(r.scan_iter(match=f"{keys.cache_prefix(tool.spec.name)}*")) == []
    assert len(list(r.scan_iter(match=f"{keys.cache_prefix(kept.spec.name)}*"))) == 1
    assert clear_cache(r, kept.spec.name) == 1
    r.delete(keys.cache_stats(tool.spec.name), keys.cache_stats(kept.spec.name))
    assert r.exists(threshold_key(tool.spec.name)) == 0


def probe(
    settings: Settings, tool: Tool, user: str, question: str, base_policy: HitPolicy | None = None
) -> Probe | None:
    """What the live lookup finds and decides for one question (the path the bench runs)."""

    async def main() -> Probe | None:
        client = async_redis_client(settings.redis_url or "")
        try:
            cache = SemanticCache(client, settings, base_policy=base_policy)
            return await cache.probe(tool, {"query": question}, question, None, ToolContext(user))
        finally:
            await client.aclose()

    return asyncio.run(main())


# Wide open distance and score cuts: only the second checks can stop a neighbour.
OPEN = HitPolicy(max_distance=0.5, min_score=0.0)


def test_a_swapped_country_is_vetoed_by_the_names_check_in_the_live_cache(
    settings: Settings, user: str
) -> None:
    # With the cuts open, a lowercased stored question ("what is the capital of france")
    # has no names to compare and was served: the veto needs the entry's capitals.
    tool = CountingTool(max_distance=0.5)
    first, second = ask(settings, tool, [
        (user, "What is the capital of France?"),
        (user, "What is the capital of Germany?"),
    ], base_policy=OPEN)  # fmt: skip
    assert not first.cached and not second.cached and tool.runs == 2
    found = probe(settings, tool, user, "What is the capital of Spain?", OPEN)
    assert found is not None and found.hit is None
    assert found.candidate in {"What is the capital of France?", "What is the capital of Germany?"}
    assert found.decision.reason == "entities differ"


def test_the_same_question_with_dont_in_both_is_served_from_the_live_cache(
    settings: Settings, user: str
) -> None:
    # Stored as "dont", the entry looked un-negated next to the query's "don't": vetoed.
    tool = CountingTool()
    first, second = ask(settings, tool, [
        (user, "Why don't cats like water?"),
        (user, "Why don't cats like water at all?"),
    ])  # fmt: skip
    assert not first.cached and second.cached and tool.runs == 1
    assert second.distance is not None and 0 < second.distance <= 0.06


def test_the_same_question_with_20000_in_both_is_served_from_the_live_cache(
    settings: Settings, user: str
) -> None:
    # Stored as "20 000", the entry's numbers were {20, 0}, not the query's {20000}: vetoed.
    tool = CountingTool()
    first, second = ask(settings, tool, [
        (user, "Which is the best laptop under 20,000 rupees?"),
        (user, "What is the best laptop under 20,000 rupees?"),
    ])  # fmt: skip
    assert not first.cached and second.cached and tool.runs == 1
    assert second.distance is not None and 0 < second.distance <= 0.06


def test_a_probe_reports_the_candidate_it_judged_even_on_a_miss(
    settings: Settings, user: str
) -> None:
    tool = CountingTool()
    ask(settings, tool, [(user, "How many replicas does Redis need for 3 shards?")])
    found = probe(settings, tool, user, "How many replicas does Redis need for 5 shards?")
    assert found is not None and found.hit is None and not found.exact_entry
    assert found.candidate == "How many replicas does Redis need for 3 shards?"
    assert found.decision.reason == "numbers differ"
    assert found.distance is not None and 0 < found.distance <= 0.06
    exact = probe(settings, tool, user, "how many replicas does redis need for 3 shards")
    assert exact is not None and exact.exact_entry and exact.hit is not None
    assert exact.candidate == "How many replicas does Redis need for 3 shards?"


def test_a_tool_that_opts_out_is_never_cached(
    settings: Settings, r: redis.Redis, user: str
) -> None:
    tool = CountingTool()
    assert tool.policy is not None
    tool.policy = dataclasses.replace(tool.policy, enabled=False)
    routed = ask(settings, tool, [(user, "Is the east pier open?")] * 2)
    assert [x.cached for x in routed] == [False, False] and tool.runs == 2
    assert list(r.scan_iter(match=f"{keys.cache_prefix(tool.spec.name)}*")) == []
