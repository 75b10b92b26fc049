"""The tools the model may call, by name.

`make_tools` offers kb_search always and web_search only when SEARXNG_URL is
set; the orchestrator passes `[t.spec for t in tools.values()]` to the provider
and routes each ToolCall to `tools[call.name]`.
"""

from __future__ import annotations

import dataclasses

import redis.asyncio as aredis

from app.embeddings import Embedder
from app.settings import Settings
from app.tools.base import CachePolicy, Tool, ToolContext, ToolResult
from app.tools.kb_search import KbSearch
from app.tools.web_search import WebSearch

__all__ = [
    "CachePolicy",
    "KbSearch",
    "Tool",
    "ToolContext",
    "ToolResult",
    "WebSearch",
    "make_tools",
]


def make_tools(settings: Settings, redis: aredis.Redis, embedder: Embedder) -> dict[str, Tool]:
    """name -> tool; building them does no I/O."""
    tools: list[Tool] = [KbSearch(redis, embedder)]
    if settings.searxng_url:
        tools.append(WebSearch(settings.searxng_url, timeout=settings.tool_timeout_seconds))
    for tool in tools:
        if tool.spec.name in settings.cache_skip_tools and tool.policy is not None:
            tool.policy = dataclasses.replace(tool.policy, enabled=False)  # this instance only
    return {t.spec.name: t for t in tools}
