"""A tool's arguments other than the query are part of what the semantic cache matches:
the KNN filters on `args_digest`, so a call is never served a neighbour computed with
another argument set, however close the question. Real Redis Stack, real model.

The regression (issue #23, item 10): the KNN ignored them, so the same query with
`{"strict": 1}` and then `{"strict": true}` was a hit at distance 0.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
from redisvl.index import SearchIndex
from redisvl.schema import IndexSchema
from test_case_isolation import wait_indexed

from app.cache.semantic import SemanticCache, args_digest, entry_key
from app.embeddings import Vector, shared_embedder
from app.llm.base import ToolSpec
from app.settings import Settings
from app.stores import indexes
from app.stores.clients import async_redis_client
from app.tools.base import CachePolicy, ToolContext, ToolResult, query_text_of
from app.tools.kb_search import parse_search_reply

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "strict": {}, "lang": {"type": "string"}},
    "required": ["query"],
}
QUESTION = "Which ferry leaves the harbour first in the morning?"
REWORDED = "Which ferry departs the harbour first in the morning?"


class FilteredSearch:
    """A global tool with arguments besides the query; its result names them."""

    def __init__(self) -> None:
        self.spec = ToolSpec(f"f_{uuid.uuid4().hex[:12]}", "filtered search", PARAMETERS)
        self.policy = CachePolicy(max_distance=0.2, ttl_seconds=600, scope="global")

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        return ToolResult(f"results for {sorted(arguments.items())!r}")


def served(
    settings: Settings, stored: list[dict[str, Any]], asked: list[dict[str, Any]],
    tool: FilteredSearch | None = None,
) -> list[str | None]:
    """Store a result for each of `stored`, then look up each of `asked`: the served
    result's content (None: a miss). Every call is through the KNN (exact keys differ)."""
    tool, ctx = tool or FilteredSearch(), ToolContext("u-args")
    embedder = shared_embedder()

    async def main() -> list[str | None]:
        client = async_redis_client(settings.redis_url or "")
        cache = SemanticCache(client, settings, embedder=embedder)
        try:
            for args in stored:
                q = args["query"]
                result = await tool.run(args, ctx)
                assert await cache.store(tool, args, q, embedder.embed(q), ctx, result, 5.0) \
                    is False  # no flight held
            out = []
            for args in asked:
                q = args["query"]
                hit = await cache.lookup(tool, args, q, embedder.embed(q), ctx)
                out.append(hit.result.content if hit is not None else None)
            await cache.drain()
            return out
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize(("stored", "asked"), [
    ({"strict": 1}, {"strict": True}),
    ({"strict": 1}, {"strict": 1.0}),
    ({"strict": 1}, {"strict": "1"}),
    ({"strict": 1}, {}),
    ({}, {"strict": 1}),
    ({"lang": "en"}, {"lang": "EN"}),  # differing only by case
    ({"lang": "en"}, {"lang": "e\u043d"}),  # a Cyrillic lookalike
    ({"lang": "en"}, {"Lang": "en"}),
], ids=["1-vs-true", "1-vs-1.0", "1-vs-'1'", "1-vs-none", "none-vs-1", "en-vs-EN",
        "en-vs-lookalike", "lang-vs-Lang"])
def test_a_call_is_never_served_an_entry_of_another_argument_set(
    settings: Settings, stored: dict[str, Any], asked: dict[str, Any]
) -> None:
    same, reworded = served(settings, [{"query": QUESTION, **stored}],
                            [{"query": QUESTION, **asked}, {"query": REWORDED, **asked}])
    assert (same, reworded) == (None, None)


def test_the_same_other_arguments_are_still_served_to_a_reworded_question(
    settings: Settings,
) -> None:
    args = {"strict": True, "lang": "en"}
    reworded, = served(settings, [{"query": QUESTION, **args}],
                       [{"query": REWORDED, "lang": "en", "strict": True}])
    assert reworded == f"results for {sorted({'query': QUESTION, **args}.items())!r}"


def test_an_entry_records_the_digest_of_its_other_arguments(
    settings: Settings, r: redis.Redis
) -> None:
    tool = FilteredSearch()
    args = {"query": QUESTION, "strict": 1}
    served(settings, [args], [], tool)
    key = entry_key(tool.spec.name, "global", args, QUESTION, model=shared_embedder().model_id)
    assert r.hget(key, "args_digest") == args_digest({"strict": 1}).encode()
    # The query is not part of it; the order is not; the type of a value is.
    assert args_digest({"query": "anything"}) == args_digest({})
    assert args_digest({"query": "a", "strict": 1, "lang": "en"}) == args_digest(
        {"lang": "en", "strict": 1, "query": "b"})
    assert len({args_digest({"strict": v}) for v in (1, 1.0, True, "1", None)}) == 5


def test_start_up_rebuilds_a_cache_index_made_before_argument_digests(r: redis.Redis) -> None:
    tag = uuid.uuid4().hex[:8]
    name, prefix = f"idx:test-argsdigest-{tag}", f"argsdigest-{tag}:"
    spec = indexes.schema("cache").to_dict()
    spec["index"]["name"], spec["index"]["prefix"] = name, prefix
    new = IndexSchema.from_dict(spec)
    spec["fields"] = [f for f in spec["fields"] if f["name"] != "args_digest"]
    SearchIndex(IndexSchema.from_dict(spec), redis_client=r).create()
    digest = args_digest({"strict": 1})
    r.hset(f"{prefix}1", mapping={"tool": "t", "scope": "global", "args_digest": digest})
    try:
        assert indexes.ensure(r, new) == "upgraded"
        wait_indexed(r, name, 1)
        reply = r.execute_command("FT.SEARCH", name, f"@args_digest:{{{digest}}}", "NOCONTENT",
                                  "DIALECT", 2)
        assert parse_search_reply(reply)[0] == 1  # the hash written before: found by it
        assert indexes.ensure(r, new) is None  # once
    finally:
        r.ft(name).dropindex(delete_documents=True)
