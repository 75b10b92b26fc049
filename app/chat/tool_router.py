"""The one path every tool call takes: validate, (cache lookup), run with a timeout.

The query is embedded once per call, off the event loop, and that vector
serves the cache lookup, the retrieval and the cache store. The semantic cache
(`app.cache.semantic`) plugs in through the `Cache` protocol (`app.cache.protocol`); without one,
every call runs its tool. A call never raises: an unknown tool, bad arguments,
a timeout or a failing service all come back as an error result, so the turn
continues.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from app.cache.protocol import Cache
from app.embeddings import Embedder, Vector
from app.llm.base import ToolCall, ToolSpec
from app.tools.base import Tool, ToolContext, ToolResult


@dataclass(frozen=True)
class Routed:
    """What a tool call produced, and how: `cached`, the distance of the hit, timings."""

    result: ToolResult
    cached: bool = False
    distance: float | None = None
    elapsed_ms: float = 0.0
    tool_ms: float = 0.0  # time inside the tool itself (0 on a cache hit)
    saved_ms: float | None = None  # on a hit: how long the tool took when it ran


class ToolRouter:
    def __init__(
        self, tools: dict[str, Tool], embedder: Embedder, timeout: float,
        cache: Cache | None = None,
    ) -> None:
        self.tools = tools
        self.embedder = embedder
        self.timeout = timeout
        self.cache = cache

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    async def run(self, call: ToolCall, ctx: ToolContext) -> Routed:
        started = time.perf_counter()
        tool = self.tools.get(call.name)
        if tool is None:
            return Routed(ToolResult.failed(f"unknown tool {call.name!r}"), elapsed_ms=_ms(started))
        try:
            return await asyncio.wait_for(self._run(tool, call, ctx, started), self.timeout)
        except TimeoutError:
            return Routed(
                ToolResult.failed(f"{call.name} did not answer within {self.timeout:g} s"),
                elapsed_ms=_ms(started),
            )

    async def _run(self, tool: Tool, call: ToolCall, ctx: ToolContext, started: float) -> Routed:
        query = tool.query_text(call.arguments)
        vector: Vector | None = None
        cache = self.cache if tool.policy is not None and query else None
        # The cache may answer from its exact-match fast path without a vector.
        if query and (cache is None or cache.needs_vector(tool, call.arguments, query)):
            vector = await self.embedder.aembed(query)
        if cache is not None:
            hit = await cache.lookup(tool, call.arguments, query, vector, ctx)
            if hit is not None:
                return Routed(hit.result, cached=True, distance=hit.distance,
                              elapsed_ms=_ms(started), saved_ms=hit.tool_ms)
        tool_started = time.perf_counter()
        result = await tool.run(call.arguments, ctx, vector)
        tool_ms = _ms(tool_started)
        if cache is not None and result.error is None:
            await cache.store(tool, call.arguments, query, vector, ctx, result, tool_ms)
        return Routed(result, elapsed_ms=_ms(started), tool_ms=tool_ms)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)
