"""OpenAICompatProvider against a real HTTP server speaking the chat-completions stream."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakes import Failure, FakeOpenAI, Stream, text_reply, tool_call_reply, usage_chunk

from app.llm import (
    OpenAICompatProvider,
    ProviderError,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    make_provider,
)
from app.settings import Settings
from app.stack.embedded import free_port

KB = ToolSpec("kb_search", "Search the knowledge base.", {"type": "object", "properties": {}})
HELLO = [{"role": "user", "content": "hello"}]


def collect(provider: OpenAICompatProvider, tools: list[ToolSpec] | None = None) -> list[Any]:
    async def run() -> list[ProviderEvent]:
        return [e async for e in provider.stream(HELLO, tools or [])]

    return asyncio.run(run())


def provider(base: str, timeout: float = 5.0, key: str | None = None) -> OpenAICompatProvider:
    return OpenAICompatProvider(base + "/v1", "test-model", key, timeout)


def test_streams_text_deltas_then_one_stream_end_with_usage() -> None:
    fake = FakeOpenAI()
    fake.script(text_reply("Redis keeps it in memory.", pieces=4))
    with fake.serve() as base:
        events = collect(provider(base, key="sk-test"))
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(texts) == 4 and "".join(texts) == "Redis keeps it in memory."
    assert events[-1] == StreamEnd(
        "stop", {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    )
    assert sum(isinstance(e, StreamEnd) for e in events) == 1
    sent = fake.requests[0]
    assert sent["stream"] is True and sent["model"] == "test-model"
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == HELLO and "tools" not in sent
    assert fake.headers[0]["authorization"] == "Bearer sk-test"


def test_assembles_a_tool_call_whose_arguments_arrive_in_fragments() -> None:
    fake = FakeOpenAI()
    args = {"query": "how does HNSW pick neighbours?", "k": 3}
    fake.script(tool_call_reply("kb_search", args, call_id="call_abc"))
    with fake.serve() as base:
        events = collect(provider(base), [KB])
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert len(calls) == 1
    assert (calls[0].id, calls[0].name, calls[0].arguments) == ("call_abc", "kb_search", args)
    assert isinstance(events[-1], StreamEnd) and events[-1].finish_reason == "tool_calls"
    assert fake.requests[0]["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "kb_search",
                "description": KB.description,
                "parameters": KB.parameters,
            },
        }
    ]


def test_assembles_two_parallel_tool_calls_by_index() -> None:
    first, second = (
        tool_call_reply("kb_search", {"query": "aof"}, call_id="c0", index=0),
        tool_call_reply("web_search", {"query": "rdb"}, call_id="c1", index=1),
    )
    # Interleave the fragments of both calls, as parallel tool calls arrive.
    body = [c for pair in zip(first.chunks[:-2], second.chunks[:-2], strict=False) for c in pair]
    fake = FakeOpenAI()
    fake.script(Stream([*body, first.chunks[-2], usage_chunk()]))
    with fake.serve() as base:
        events = collect(provider(base), [KB])
    calls = [e.call for e in events if isinstance(e, ToolCallRequest)]
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("c0", "kb_search", {"query": "aof"}),
        ("c1", "web_search", {"query": "rdb"}),
    ]


def test_a_stream_that_ends_with_done_but_no_usage_reports_empty_usage() -> None:
    fake = FakeOpenAI()
    fake.script(text_reply("ok", usage=False))
    with fake.serve() as base:
        events = collect(provider(base))
    assert events[-1] == StreamEnd("stop", {})


def test_http_500_with_openai_error_body_names_status_and_message() -> None:
    fake = FakeOpenAI()
    fake.script(Failure(500, {"error": {"message": "model overloaded", "type": "server_error"}}))
    with fake.serve() as base, pytest.raises(ProviderError) as info:
        collect(provider(base))
    assert "HTTP 500" in info.value.message and "model overloaded" in info.value.message
    assert info.value.code == "llm_unavailable" and info.value.status == 503


def test_http_401_says_the_key_was_refused() -> None:
    fake = FakeOpenAI()
    fake.script(Failure(401, {"error": {"message": "Incorrect API key provided: sk-bad"}}))
    with fake.serve() as base, pytest.raises(ProviderError, match=r"HTTP 401.*Incorrect API key"):
        collect(provider(base, key="sk-bad"))


def test_an_error_body_that_is_not_json_is_quoted() -> None:
    fake = FakeOpenAI()
    fake.script(Failure(502, "upstream connect error"))
    with fake.serve() as base, pytest.raises(ProviderError, match="HTTP 502: upstream connect"):
        collect(provider(base))


def test_connection_refused_is_a_provider_error() -> None:
    port = free_port()  # nothing listens here
    with pytest.raises(ProviderError, match="cannot connect"):
        collect(provider(f"http://127.0.0.1:{port}"))


def test_a_stalled_stream_hits_the_timeout() -> None:
    fake = FakeOpenAI()
    reply = text_reply("this never finishes")
    reply.stall_after = 2
    fake.script(reply)
    with fake.serve() as base, pytest.raises(ProviderError, match=r"sent nothing for 0\.5 s"):
        collect(provider(base, timeout=0.5))


def test_a_malformed_chunk_is_a_provider_error() -> None:
    fake = FakeOpenAI()
    fake.script(Stream([text_reply("a").chunks[0], "{not json"]))
    with fake.serve() as base, pytest.raises(ProviderError, match="malformed chunk"):
        collect(provider(base))


def test_a_stream_cut_off_before_finishing_is_a_provider_error() -> None:
    fake = FakeOpenAI()
    fake.script(Stream(text_reply("half an answer").chunks[:2], done=False))
    with fake.serve() as base, pytest.raises(ProviderError, match="ended the stream"):
        collect(provider(base))


def test_an_error_event_mid_stream_is_a_provider_error() -> None:
    fake = FakeOpenAI()
    fake.script(Stream([text_reply("a").chunks[1], {"error": {"message": "context too long"}}]))
    with fake.serve() as base, pytest.raises(ProviderError, match="context too long"):
        collect(provider(base))


def test_tool_call_arguments_that_are_not_json_are_refused() -> None:
    head = tool_call_reply("kb_search", {}).chunks[0]
    broken = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"query": "x'}}]},
            }
        ]
    }
    fake = FakeOpenAI()
    fake.script(Stream([head, broken]))
    with fake.serve() as base, pytest.raises(ProviderError, match="unusable tool call"):
        collect(provider(base), [KB])


def test_make_provider_picks_openai_compat_only_when_a_base_url_is_set() -> None:
    chosen = make_provider(Settings(llm_base_url="http://localhost:11434/v1", llm_model="m"))
    assert isinstance(chosen, OpenAICompatProvider)
    assert chosen.url == "http://localhost:11434/v1/chat/completions"
    assert make_provider(Settings()).name == "offline"
