"""What the tool router asks of a cache, and what a hit is.

The router (`app.chat.tool_router`) depends on this protocol, not on the
semantic cache itself, so a turn runs with any cache or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.embeddings import Vector
from app.tools.base import Tool, ToolContext, ToolResult


@dataclass(frozen=True)
class CacheHit:
    result: ToolResult
    distance: float
    entry: str
    tool_ms: float


class Cache(Protocol):
    async def lookup(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext,
    ) -> CacheHit | None: ...

    async def store(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext, result: ToolResult, tool_ms: float,
    ) -> None: ...

    def needs_vector(self, tool: Tool, arguments: dict[str, Any], query: str) -> bool: ...

    async def flush_counts(self) -> None: ...
