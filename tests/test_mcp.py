"""The MCP server at /mcp, driven by the official SDK's client against a real `backbone serve`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
from mcp import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
from mcp.shared.exceptions import MCPError

from app.embeddings import shared_embedder
from app.kb.ingest import doc_id, ingest_paths
from app.settings import Settings
from tests.live import app_process

Headers = Callable[[str], dict[str, str]]
TOOLS = {"search_memories", "add_memory", "forget_memory", "search_knowledge"}
LIGHTHOUSE = """# Skerrow lighthouse

The Skerrow lighthouse keeper lights the lamp at dusk and logs every passing ship in
the green ledger kept on the second landing.
"""

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def base(settings: Settings) -> Iterator[str]:
    with app_process(settings) as (url, _):
        yield url


@asynccontextmanager
async def mcp_session(base: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(f"{base}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def result_of(res: Any) -> dict[str, Any]:
    assert not res.is_error, res.content
    if res.structured_content is not None:
        return dict(res.structured_content)
    return dict(json.loads(res.content[0].text))


async def test_the_server_lists_the_four_tools_each_with_a_json_schema(
    base: str, user: str, token_for: Headers,
) -> None:
    async with mcp_session(base, token_for(user)) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
    assert set(tools) == TOOLS
    assert tools["search_memories"].input_schema["required"] == ["text"]
    assert "limit" in tools["search_memories"].input_schema["properties"]
    assert tools["forget_memory"].input_schema["required"] == ["id"]


async def test_add_then_search_finds_it_then_forget_then_search_does_not(
    base: str, user: str, token_for: Headers,
) -> None:
    async with mcp_session(base, token_for(user)) as s:
        added = result_of(await s.call_tool(
            "add_memory", {"content": "prefers aisle seats on trains", "kind": "preference"}))
        mid = added["memory"]["id"]
        assert added["created"] is True
        again = result_of(await s.call_tool(
            "add_memory", {"content": "Prefers aisle seats on trains.", "kind": "preference"}))
        assert (again["created"], again["memory"]["id"]) == (False, mid)
        found = result_of(await s.call_tool(
            "search_memories", {"text": "Which seat does the user want on a train?"}))
        assert [m["id"] for m in found["memories"]] == [mid]
        assert result_of(await s.call_tool("forget_memory", {"id": mid})) == {
            "id": mid, "forgotten": True}
        gone = result_of(await s.call_tool(
            "search_memories", {"text": "Which seat does the user want on a train?"}))
        assert gone["memories"] == []
        again_forget = await s.call_tool("forget_memory", {"id": mid})
        assert again_forget.is_error and "not_found" in again_forget.content[0].text


async def test_another_users_memory_is_not_found_over_mcp(
    base: str, user: str, token_for: Headers,
) -> None:
    async with mcp_session(base, token_for(user)) as s:
        mid = result_of(await s.call_tool(
            "add_memory", {"content": "keeps bees in the garden"}))["memory"]["id"]
    for intruder in (user.upper(), user.replace("u-", "u_")):
        async with mcp_session(base, token_for(intruder)) as s:
            found = result_of(await s.call_tool("search_memories", {"text": "bees"}))
            assert found["memories"] == []
            stolen = await s.call_tool("forget_memory", {"id": mid})
            assert stolen.is_error and "not_found" in stolen.content[0].text
    async with mcp_session(base, token_for(user)) as s:
        mine = result_of(await s.call_tool("search_memories", {"text": "bees"}))
        assert [m["id"] for m in mine["memories"]] == [mid]


async def test_bad_tool_arguments_come_back_as_a_tool_error(
    base: str, user: str, token_for: Headers,
) -> None:
    async with mcp_session(base, token_for(user)) as s:
        for name, args in [("search_memories", {"text": "x", "limit": 1000}),
                           ("add_memory", {"content": "x" * 300}),
                           ("forget_memory", {"id": "NOT-HEX"})]:
            res = await s.call_tool(name, args)
            assert res.is_error, (name, args)


async def test_search_knowledge_finds_the_callers_own_document_through_the_cache(
    base: str, user: str, token_for: Headers, r: redis.Redis, tmp_path: Path,
) -> None:
    path = tmp_path / f"lighthouse-{uuid.uuid4().hex[:8]}.md"
    path.write_text(LIGHTHOUSE)
    ingest_paths(r, shared_embedder(), [path], scope=f"user:{user}", progress=False)
    question = {"query": "Where does the Skerrow keeper log the passing ships?"}
    async with mcp_session(base, token_for(user)) as s:
        first = result_of(await s.call_tool("search_knowledge", question))
        second = result_of(await s.call_tool("search_knowledge", question))
    assert first["passages"][0]["id"] == f"kb:{doc_id(path)}:0"
    assert (first["cached"], second["cached"]) == (False, True)
    async with mcp_session(base, token_for(user.upper())) as s:
        other = result_of(await s.call_tool("search_knowledge", question))
    assert f"kb:{doc_id(path)}:0" not in [p["id"] for p in other["passages"]]


async def test_mcp_without_a_valid_token_is_refused_with_401(
    base: str, user: str, settings: Settings,
) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    expired = jwt.encode({"sub": user, "exp": int(time.time()) - 60},
                         settings.auth_secret or "", "HS256")
    forged = jwt.encode({"sub": user, "exp": int(time.time()) + 60},
                        "some-other-secret-that-is-long-enough", "HS256")
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic x"},
                    {"Authorization": f"Bearer {expired}"}, {"Authorization": f"Bearer {forged}"}):
        res = httpx.post(f"{base}/mcp", json=init, headers={**accept, **headers})
        assert res.status_code == 401 and res.json()["error"]["code"] == "unauthorized"
    with pytest.raises(ExceptionGroup) as refused:  # the SDK's client gives up on the 401
        async with mcp_session(base, {}) as s:
            await s.list_tools()
    assert refused.group_contains(MCPError)
