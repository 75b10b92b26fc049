"""kb_search against the real Redis index, web_search against a fake SearxNG over HTTP."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from fakes import Failure, FakeSearxng, searx_result

from app.cache.decision import FITTED_MAX_DISTANCE
from app.embeddings import shared_embedder
from app.kb.ingest import doc_id, ingest_paths
from app.settings import Settings
from app.stack.embedded import free_port
from app.stores.clients import async_redis_client
from app.stores.indexes import escape_tag
from app.tools import KbSearch, ToolContext, ToolResult, WebSearch, make_tools
from app.tools.base import MAX_QUERY_CHARS

T = TypeVar("T")

FERRY = """# Varnholm ferry timetable

The ferry to the island of Varnholm leaves pier 3 every forty minutes between
six in the morning and ten at night. In winter the last crossing is at eight.
Bicycles travel free; cars must be booked a day ahead at the harbour office.
"""

DIARY = """# Private diary of the lighthouse keeper

The lighthouse keeper hides the spare key to the lamp room under the third step.
Nobody else knows that the key is kept there.
"""


def with_kb(settings: Settings, body: Callable[[KbSearch], Awaitable[T]], protocol: int = 3) -> T:
    """Run `body` with a KbSearch on a fresh async client, in a fresh event loop."""

    async def run() -> T:
        client = async_redis_client(settings.redis_url or "", protocol=protocol)
        try:
            return await body(KbSearch(client, shared_embedder()))
        finally:
            await client.aclose()

    return asyncio.run(run())


def user() -> str:
    # Dots, @ and - all need escaping inside a tag query.
    return f"ann.lee-{secrets.token_hex(3)}@example.org"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("protocol", [2, 3])
def test_kb_search_finds_an_ingested_chunk_for_a_reworded_question(
    settings: Settings, r: redis.Redis, tmp_path: Path, protocol: int
) -> None:
    uid = user()
    path = write(tmp_path, "ferry.md", FERRY)
    ingest_paths(r, shared_embedder(), [path], scope=f"user:{uid}", progress=False)

    async def ask(kb: KbSearch) -> ToolResult:
        return await kb.run({"query": "How often do boats go over to Varnholm?"}, ToolContext(uid))

    result = with_kb(settings, ask, protocol)  # RESP2 and RESP3 replies differ in shape
    assert result.error is None
    top = result.items[0]
    assert top["id"] == f"kb:{doc_id(path)}:0" and top["title"] == "Varnholm ferry timetable"
    assert 0 < top["score"] <= 1 and top["distance"] == pytest.approx(1 - top["score"])
    assert "[1] Varnholm ferry timetable" in result.content and "forty minutes" in result.content
    # Cached results serve reworded questions: the text never quotes the asker's words.
    assert "boats" not in result.content


def test_kb_search_never_returns_another_users_private_chunks(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    owner, other = user(), user()
    path = write(tmp_path, "diary.md", DIARY)
    ingest_paths(r, shared_embedder(), [path], scope=f"user:{owner}", progress=False)
    private = f"kb:{doc_id(path)}:0"
    question = {"query": "Where is the spare key to the lamp room hidden?"}

    async def both(kb: KbSearch) -> tuple[ToolResult, ToolResult]:
        return await kb.run(question, ToolContext(owner)), await kb.run(
            question, ToolContext(other)
        )

    mine, theirs = with_kb(settings, both)
    assert private in [i["id"] for i in mine.items]
    assert private not in [i["id"] for i in theirs.items]
    assert all(i["scope"] in ("global", f"user:{other}") for i in theirs.items)
    assert "third step" not in theirs.content


def test_kb_search_uses_the_query_vector_it_is_given(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    uid = user()
    path = write(tmp_path, "ferry.md", FERRY)
    ingest_paths(r, shared_embedder(), [path], scope=f"user:{uid}", progress=False)
    vector = shared_embedder().embed("ferry crossings to Varnholm island")

    async def ask(kb: KbSearch) -> ToolResult:
        # The text says something unrelated; the cache's vector decides what is found.
        return await kb.run({"query": "zz"}, ToolContext(uid), query_vector=vector)

    assert with_kb(settings, ask).items[0]["id"] == f"kb:{doc_id(path)}:0"


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({}, "missing"),
        ({"query": "   "}, "empty"),
        ({"query": 42}, "must be a string"),
        ({"query": ["a"]}, "must be a string"),
        ({"query": "x" * (MAX_QUERY_CHARS + 1)}, "limit"),
        ("just a string", "JSON object"),
    ],
)
def test_kb_search_rejects_bad_arguments_with_an_error_result(
    settings: Settings, arguments: Any, says: str
) -> None:
    async def ask(kb: KbSearch) -> ToolResult:
        assert kb.query_text(arguments) == ""
        return await kb.run(arguments, ToolContext("someone"))

    result = with_kb(settings, ask)
    assert result.error is not None and says in result.error
    assert result.items == [] and result.content.startswith("Tool error:")


def test_kb_search_reports_an_unreachable_redis_as_an_error_result() -> None:
    async def ask() -> ToolResult:
        client = async_redis_client(f"redis://127.0.0.1:{free_port()}/0")
        try:
            vector = shared_embedder().embed("anything")
            kb = KbSearch(client, shared_embedder())
            return await kb.run({"query": "anything"}, ToolContext("u1"), query_vector=vector)
        finally:
            await client.aclose()

    result = asyncio.run(ask())
    assert result.error is not None and "knowledge base is unavailable" in result.error


def test_scope_tags_are_escaped() -> None:
    assert escape_tag("user:a.b@c-d") == r"user\:a\.b\@c\-d"


def search_web(base: str, arguments: Any) -> ToolResult:
    tool = WebSearch(base, timeout=5)
    return asyncio.run(tool.run(arguments, ToolContext("u1")))


def test_web_search_returns_the_top_five_results_from_searxng() -> None:
    results = [
        searx_result(f"https://example.org/{n}", f"Result {n}", f"About AOF, part {n}.", 9 - n)
        for n in range(7)
    ]
    results.insert(2, results[0])  # SearxNG can list a URL twice; it counts once
    fake = FakeSearxng(results)
    with fake.serve() as base:
        result = search_web(base, {"query": "redis aof rewrite & fsync"})
    assert fake.queries == [{"q": "redis aof rewrite & fsync", "format": "json"}]
    assert result.error is None
    assert [i["id"] for i in result.items] == [f"https://example.org/{n}" for n in range(5)]
    first = result.items[0]
    assert (first["url"], first["title"], first["text"]) == (
        "https://example.org/0", "Result 0", "About AOF, part 0.")  # fmt: skip
    assert "[1] Result 0 <https://example.org/0>" in result.content
    assert "fsync" not in result.content  # served to other users from the global cache


def test_web_search_turns_a_searxng_500_into_an_error_result() -> None:
    fake = FakeSearxng()
    fake.failure = Failure(500, "<html>Internal Server Error</html>")
    with fake.serve() as base:
        result = search_web(base, {"query": "anything"})
    assert result.error is not None and "HTTP 500" in result.error and result.items == []


def test_web_search_explains_a_searxng_without_the_json_format() -> None:
    fake = FakeSearxng()
    fake.failure = Failure(403, "Forbidden")
    with fake.serve() as base:
        result = search_web(base, {"query": "anything"})
    assert result.error is not None and "search.formats" in result.error


def test_web_search_reports_an_unreachable_searxng_and_bad_arguments() -> None:
    down = search_web(f"http://127.0.0.1:{free_port()}", {"query": "anything"})
    assert down.error is not None and "cannot reach SearxNG" in down.error
    bad = search_web("http://127.0.0.1:9", {"query": ""})
    assert bad.error is not None and "empty" in bad.error


def test_web_search_with_no_results_says_so() -> None:
    with FakeSearxng([]).serve() as base:
        result = search_web(base, {"query": "nothing matches this"})
    assert result.error is None and result.items == [] and "found nothing" in result.content


def test_make_tools_offers_web_search_only_when_searxng_is_configured(settings: Settings) -> None:
    client = async_redis_client(settings.redis_url or "")  # make_tools does no I/O
    plain = make_tools(Settings(), client, shared_embedder())
    both = make_tools(Settings(searxng_url="http://searx.local"), client, shared_embedder())
    assert sorted(plain) == ["kb_search"] and sorted(both) == ["kb_search", "web_search"]
    kb, web = both["kb_search"].policy, both["web_search"].policy
    # Both start at the fitted bound that holds false hits to 1 % (app.cache_decision).
    assert kb is not None and (kb.max_distance, kb.ttl_seconds, kb.scope) == (
        FITTED_MAX_DISTANCE, 3600, "user"
    )
    assert web is not None and (web.max_distance, web.ttl_seconds, web.scope) == (
        FITTED_MAX_DISTANCE, 900, "global"
    )
