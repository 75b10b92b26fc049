"""Tool calls through the Responses face: kb_search is a `file_search_call`, web_search a
`web_search_call`, each with its typed events in the stream and, when `include` asks,
its results in the conversation's items. The model and SearxNG are local stand-ins
speaking their real wire formats (tests/fakes.py); the tools, cache and stores are real."""

from __future__ import annotations

from pathlib import Path

import redis
from fakes import FakeOpenAI, FakeSearxng, searx_result, text_reply, tool_call_reply
from openai_support import Clients, served

from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings

CORPUS = Path(__file__).resolve().parent.parent / "app" / "kb" / "corpus"
PAGES = [searx_result("https://example.org/redis-8", "Redis 8 released", "Redis 8 is out."),
         searx_result("https://example.org/notes", "Release notes", "What changed.")]


def _kinds(events: list[object]) -> list[str]:
    return [str(e.type) for e in events]


def test_kb_search_and_web_search_are_file_search_and_web_search_calls(
    settings: Settings, sdk: Clients, user: str
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [CORPUS], progress=False)
    client.close()
    fake, searx = FakeOpenAI(), FakeSearxng(PAGES)
    fake.script(tool_call_reply("kb_search", {"query": "AOF persistence"}, call_id="call_kb"),
                text_reply("From the passages."),
                tool_call_reply("web_search", {"query": "redis 8 release"}, call_id="call_ws"),
                text_reply("From the web."))
    with fake.serve() as llm, searx.serve() as search, served(
        settings, llm_base_url=f"{llm}/v1", searxng_url=search
    ) as url:
        api = sdk(url, user)
        conv = api.conversations.create()
        with api.responses.create(model="m", conversation=conv.id, stream=True,
                                  input="How does AOF persistence work?") as stream:
            first = list(stream)
        with api.responses.create(model="m", conversation=conv.id, stream=True,
                                  input="Is there news about Redis 8?") as stream:
            second = list(stream)
        plain = api.conversations.items.list(conv.id, order="asc")
        full = api.conversations.items.list(
            conv.id, order="asc",
            include=["file_search_call.results", "web_search_call.action.sources"])

    assert _kinds(first)[2:7] == [
        "response.output_item.added", "response.file_search_call.in_progress",
        "response.file_search_call.searching", "response.file_search_call.completed",
        "response.output_item.done"]
    assert _kinds(second)[2:7] == [
        "response.output_item.added", "response.web_search_call.in_progress",
        "response.web_search_call.searching", "response.web_search_call.completed",
        "response.output_item.done"]
    fs = first[6].item  # type: ignore[attr-defined]
    ws = second[6].item  # type: ignore[attr-defined]
    assert fs.type == "file_search_call" and fs.status == "completed"
    assert fs.queries == ["AOF persistence"]
    assert ws.type == "web_search_call" and ws.action.query == "redis 8 release"
    assert first[-1].response.output_text == "From the passages."  # type: ignore[attr-defined]
    assert second[-1].response.output_text == "From the web."  # type: ignore[attr-defined]
    assert searx.queries and searx.queries[0]["q"] == "redis 8 release"

    kinds = [i.type for i in plain.data]
    assert kinds == ["message", "file_search_call", "message"] * 1 + [
        "message", "web_search_call", "message"]
    assert plain.data[1].id == fs.id and plain.data[4].id == ws.id
    assert plain.data[1].results is None  # type: ignore[union-attr]
    results = full.data[1].results  # type: ignore[union-attr]
    assert results and all(r.text for r in results)
    assert "aof" in " ".join(r.text or "" for r in results).lower()
    sources = full.data[4].action.sources  # type: ignore[union-attr]
    assert [s.url for s in sources] == [p["url"] for p in PAGES]
