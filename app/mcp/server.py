"""The MCP server (the official `mcp` SDK), streamable HTTP, stateless, at `/mcp`.

Four tools, each over what the caller's token may read:

    search_memories   POST /v1/memories/search, as a tool
    add_memory        POST /v1/memories
    forget_memory     DELETE /v1/memories/{id}
    search_knowledge  kb_search through the semantic cache (the chat turn's ToolRouter),
                      with the caller's scopes

The tools call the same `MemoryService` and request checks as the REST routes,
so a tool call and a request behave alike (dedupe, 404 for another user's id).
A client error (bad arguments, not found, a duplicate) comes back as a tool
result with `isError` and `<code>: <message>`; a failing store as well, so the
agent can tell the user. Stateless (`stateless_http=True`): no MCP session
lives on the node, so any API node answers any request. DNS rebinding
protection is off: it guards unauthenticated local servers, and every request
here carries a bearer token a rebinding page cannot attach.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.types import ASGIApp

from app.errors import translate
from app.identity import Identity
from app.llm.base import ToolCall
from app.mcp.gate import WHO, BearerGate
from app.memory import requests
from app.memory.facts import Kind
from app.memory.routes import check_memory_id
from app.settings import Settings
from app.state import AppState
from app.tools.base import ToolContext

INSTRUCTIONS = (
    "Long-term memory about the user and a searchable knowledge base. Search memories "
    "before asking the user something they may have told you; add a memory for a durable "
    "fact about the user (one short statement, third person, no subject: 'prefers window "
    "seats'); forget one when the user asks."
)


def _identified(ctx: Context) -> tuple[AppState, Identity]:
    request = ctx.request_context.request
    assert isinstance(request, Request), "the streamable HTTP transport passes the request"
    state: AppState = request.state.backbone
    return state, request.scope[WHO]


def _caller(ctx: Context) -> tuple[AppState, str]:
    state, who = _identified(ctx)
    return state, who.user


@contextmanager
def _as_tool_errors() -> Iterator[None]:
    """Our errors (and the stores' errors, as `translate` maps them) become a ToolError
    the agent reads as `<code>: <message>`; anything else stays a crash."""
    try:
        yield
    except Exception as e:
        mapped = translate(e)
        if mapped is None:
            raise
        raise ToolError(f"{mapped.code}: {mapped.message}") from e


def build(settings: Settings) -> tuple[MCPServer, ASGIApp]:
    """The server (its `session_manager.run()` belongs in the app's lifespan) and the
    ASGI app that answers `/mcp` (its own router matches that path), behind the gate."""
    server: MCPServer = MCPServer(
        name="redis-backbone", instructions=INSTRUCTIONS, version="0.1.0"
    )

    @server.tool()
    async def search_memories(
        text: str,
        ctx: Context,
        kinds: list[Kind] | None = None,
        session_id: str | None = None,
        since: str | float | None = None,
        until: str | float | None = None,
        limit: int = requests.DEFAULT_LIMIT,
        max_distance: float | None = None,
    ) -> dict[str, Any]:
        """Search the user's long-term memories by meaning, nearest first. Optional filters:
        kinds, the session a memory came from, `since`/`until` (when it was last updated:
        ISO 8601 with an offset, or seconds since the epoch), limit (1-100) and
        max_distance (cosine distance 0-2; about 0.8 keeps only related memories)."""
        state, user = _caller(ctx)
        body = {k: v for k, v in {
            "text": text, "kinds": kinds, "session_id": session_id, "since": since,
            "until": until, "limit": limit, "max_distance": max_distance,
        }.items() if v is not None}  # fmt: skip
        with _as_tool_errors():
            req = requests.search_request(body)
            return {"memories": await state.memories.search(user, req)}

    @server.tool()
    async def add_memory(
        content: str, ctx: Context, kind: Kind = requests.DEFAULT_KIND,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Remember a durable fact about the user (at most 200 characters). An exact or
        near repeat of a memory updates that one: `created` is false and `memory.id` is
        the existing memory's id."""
        state, user = _caller(ctx)
        body: dict[str, Any] = {"content": content, "kind": kind}
        if session_id is not None:
            body["session_id"] = session_id
        with _as_tool_errors():
            memory, created = await state.memories.add(user, requests.add_request(body))
        return {"memory": memory, "created": created}

    @server.tool()
    async def forget_memory(id: str, ctx: Context) -> dict[str, Any]:
        """Forget one of the user's memories by its id (from search_memories or add_memory)."""
        state, user = _caller(ctx)
        with _as_tool_errors():
            await state.memories.forget(user, check_memory_id(id))
        return {"id": id, "forgotten": True}

    @server.tool()
    async def search_knowledge(query: str, ctx: Context) -> dict[str, Any]:
        """Search the knowledge base (project documents and the user's own files) for
        passages relevant to a question; cite them by id."""
        state, who = _identified(ctx)  # the tenant's documents too, as in a chat turn
        call = ToolCall(f"mcp-{uuid.uuid4().hex[:12]}", "kb_search", {"query": query})
        routed = await state.turn_deps.router.run(call, ToolContext(who.user, who.tenant))
        if routed.result.error is not None:
            raise ToolError(routed.result.error)
        return {
            "passages": [
                {k: item.get(k) for k in ("id", "title", "text", "source", "score")}
                for item in routed.result.items
            ],
            "cached": routed.cached,
        }

    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    return server, BearerGate(app)

