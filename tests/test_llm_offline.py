"""The offline provider: asks kb_search, then answers from the passages with citations."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from starlette.testclient import TestClient

from app.chat.context import CONTEXT_TOKEN_BUDGET, estimate_tokens
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.llm import (
    OfflineProvider,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    make_provider,
)
from app.settings import Settings
from app.stores.clients import async_redis_client
from app.tools import KbSearch, ToolContext, ToolResult
from app.tools.passages import format_passages

KB = KbSearch.spec
OTHER = ToolSpec("calculator", "Adds numbers.", {"type": "object", "properties": {}})


def step(messages: list[dict[str, Any]], tools: list[ToolSpec]) -> list[ProviderEvent]:
    async def run() -> list[ProviderEvent]:
        return [e async for e in OfflineProvider(token_delay_ms=0).stream(messages, tools)]

    return asyncio.run(run())


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def test_a_user_question_becomes_a_kb_search_request() -> None:
    events = step([{"role": "user", "content": "  What is  an AOF rewrite? "}], [OTHER, KB])
    assert len(events) == 2 and isinstance(events[0], ToolCallRequest)
    call = events[0].call
    assert (call.name, call.arguments) == ("kb_search", {"query": "What is an AOF rewrite?"})
    assert isinstance(events[1], StreamEnd) and events[1].finish_reason == "tool_calls"


def test_tool_results_become_a_cited_answer_streamed_word_by_word() -> None:
    items = [
        {"id": "kb:a:0", "title": "Redis persistence", "text": "The AOF logs every write. More."},
        {"id": "kb:b:1", "title": "Expiry", "text": "Keys can expire."},
        {"id": "kb:c:2", "title": "Lua", "text": "Scripts run atomically."},
        {"id": "kb:d:3", "title": "Fourth", "text": "Not used."},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "How does Redis persist?"},
        {"role": "assistant", "content": "", "tool_calls": []},
        tool_message("offline_1", format_passages('Knowledge-base passages for "x":', items)),
    ]
    events = step(messages, [KB])
    answer = text_of(events)
    assert "not a language model" in answer
    assert "The AOF logs every write. More. [1]" in answer and "[3]" in answer
    assert answer.endswith("Sources: [1] Redis persistence; [2] Expiry; [3] Lua")
    assert "Fourth" not in answer
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) == len(answer.split())  # one delta per word
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason == "stop"
    assert end.usage["completion_tokens"] == len(answer.split())
    assert sum(isinstance(e, StreamEnd) for e in events) == 1


def test_without_kb_search_it_says_it_is_an_offline_stand_in() -> None:
    events = step([{"role": "user", "content": "Write me a poem"}], [OTHER])
    answer = text_of(events)
    assert "offline stand-in, not a language model" in answer and "Write me a poem" in answer
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "stop"


def test_an_empty_or_failed_search_is_admitted_plainly() -> None:
    for content in (ToolResult.failed("the knowledge base is unavailable").content, "nothing"):
        messages = [{"role": "user", "content": "Where is my key?"}, tool_message("c", content)]
        events = step(messages, [KB])
        assert "returned nothing" in text_of(events) and "Where is my key?" in text_of(events)
        assert isinstance(events[-1], StreamEnd)


def test_no_messages_still_ends_with_stream_end() -> None:
    events = step([], [KB])
    assert isinstance(events[-1], StreamEnd) and "no question" in text_of(events)


def test_make_provider_is_offline_without_a_base_url() -> None:
    provider = make_provider(Settings(offline_token_delay_ms=5))
    assert isinstance(provider, OfflineProvider) and provider.token_delay == 0.005


def test_offline_flow_with_the_real_kb_search_cites_the_ingested_document(
    settings: Settings, r: redis.Redis, tmp_path: Path
) -> None:
    uid = f"offline-{secrets.token_hex(4)}"
    doc = tmp_path / "kiln.md"
    doc.write_text(
        "# Pottery kiln guide\n\nThe kiln in the north studio is fired to 1240 degrees for "
        "stoneware. Let it cool for two full days before opening the door.\n"
    )
    ingest_paths(r, shared_embedder(), [doc], scope=f"user:{uid}", progress=False)

    async def turn() -> list[ProviderEvent]:
        client = async_redis_client(settings.redis_url or "")
        provider, kb = OfflineProvider(token_delay_ms=1), KbSearch(client, shared_embedder())
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "How long should the kiln cool down?"}
        ]
        try:
            first = [e async for e in provider.stream(messages, [kb.spec])]
            request = first[0]
            assert isinstance(request, ToolCallRequest)
            result = await kb.run(request.call.arguments, ToolContext(uid))
            messages += [
                {"role": "assistant", "content": "", "tool_calls": [request.call.to_openai()]},
                tool_message(request.call.id, result.content),
            ]
            return [e async for e in provider.stream(messages, [kb.spec])]
        finally:
            await client.aclose()

    events = asyncio.run(turn())
    answer = text_of(events)
    assert "two full days" in answer and "[1]" in answer
    assert "Sources: [1] Pottery kiln guide" in answer
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "stop"


def test_passages_from_one_document_share_one_source_entry() -> None:
    items = [
        {"id": "kb:a:0", "title": "Lua", "text": "Scripts run atomically."},
        {"id": "kb:a:1", "title": "Lua", "text": "continued from before. Keys go in KEYS."},
    ]
    content = format_passages("Passages:", items)
    answer = text_of(step([{"role": "user", "content": "q"}, tool_message("c", content)], [KB]))
    assert answer.endswith("Sources: [1][2] Lua")
    assert "Keys go in KEYS. [2]" in answer and "continued from before" not in answer


def test_the_same_trimmed_context_twice_gets_two_different_tool_call_ids() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Same length?"}]
    first, second = step(messages, [KB])[0], step(messages, [KB])[0]
    assert isinstance(first, ToolCallRequest) and isinstance(second, ToolCallRequest)
    assert first.call.id != second.call.id and first.call.id.startswith("offline_")


def test_tool_call_ids_stay_unique_over_a_long_session_whose_context_is_trimmed(
    client: TestClient, token_for: Callable[[str], dict[str, str]], user: str
) -> None:
    h = token_for(user)
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    # ~1500 tokens a question against a 3000-token budget: trimming starts on turn 2
    filler = "Tell me about AOF persistence and fsync. " * 150
    for n in range(8):
        with client.stream(
            "POST", f"/v1/sessions/{sid}/messages", headers=h, json={"content": f"{n} {filler}"}
        ) as res:
            assert res.status_code == 200
            res.read()
    history = client.get(f"/v1/sessions/{sid}", headers=h).json()["messages"]
    assert sum(estimate_tokens(m.get("content") or "") for m in history) > 3 * CONTEXT_TOKEN_BUDGET
    asked = [c["id"] for m in history for c in m.get("tool_calls") or []]
    answered = [m["tool_call_id"] for m in history if m["role"] == "tool"]
    assert len(asked) == 8 and len(set(asked)) == 8
    assert answered == asked
