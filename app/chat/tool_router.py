"""The one path every tool call takes: validate, (cache lookup), run with a timeout.

The query is embedded once per call, off the event loop, and that vector
serves the cache lookup, the retrieval and the cache store. The semantic cache
(`app.cache.semantic`) plugs in through the `Cache` protocol (`app.cache.protocol`); without one,
every call runs its tool. A miss joins the call's single flight
(`app.cache.flight`): of concurrent misses for one entry, on any node, one runs
the tool and the others wait for its result, at most half the tool timeout,
before running it themselves. A tool made of parts (`SplitTool`: kb_search's
global and private retrievals) goes through the cache part by part, the parts
concurrently, and the parts' results are merged; a part known to find nothing
(a private scope never written to) is not run at all, and is not in `parts`.

A call never raises: an unknown tool, bad arguments, a timeout or a failing
service all come back as an error result, so the turn continues.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from app.cache.protocol import Cache, Flight
from app.embeddings import Embedder, Vector
from app.llm.base import ToolCall, ToolSpec
from app.tools.base import Tool, ToolContext, ToolResult, split_of


@dataclass(frozen=True)
class Routed:
    """What a tool call produced, and how: `cached`, the distance of the hit, timings."""

    result: ToolResult
    cached: bool = False
    distance: float | None = None
    elapsed_ms: float = 0.0
    tool_ms: float = 0.0  # time inside the tool itself (0 on a cache hit)
    saved_ms: float | None = None  # on a hit: how long the tool took when it ran
    # A tool run in parts: (part scope, served from the cache) per part, e.g. the global
    # part a hit and the caller's own part a miss.
    parts: tuple[tuple[str, bool], ...] = ()
    exact: bool = False  # every hit came from the exact entry (no KNN)


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
        policy = tool.policy
        cache = self.cache if policy is not None and policy.enabled and query else None
        split = split_of(tool) if cache is not None else None
        units = await split.parts_to_run(ctx) if split is not None else [tool]
        # The cache may answer from its exact-match fast path without a vector.
        if query and (
            cache is None or any(cache.needs_vector(u, call.arguments, query) for u in units)
        ):
            vector = await self.embedder.aembed(query)
        if split is None:
            return await self._cached(tool, call, query, vector, ctx, cache, started)
        done = await asyncio.gather(
            *(self._cached(u, call, query, vector, ctx, cache, started) for u in units)
        )
        hit = all(r.cached for r in done)
        return Routed(
            split.merge([r.result for r in done]), cached=hit, exact=hit and all(
                r.exact for r in done),
            distance=max(r.distance or 0.0 for r in done) if hit else None,
            elapsed_ms=_ms(started), tool_ms=round(sum(r.tool_ms for r in done), 2),
            saved_ms=round(sum(r.saved_ms or 0.0 for r in done), 2) if hit else None,
            parts=tuple(
                (u.policy.scope if u.policy else "", r.cached)
                for u, r in zip(units, done, strict=True)
            ),
        )  # fmt: skip

    async def _cached(
        self, tool: Tool, call: ToolCall, query: str, vector: Vector | None, ctx: ToolContext,
        cache: Cache | None, started: float,
    ) -> Routed:
        """Lookup, else the single flight, else run the tool and store its result."""
        flight = Flight()
        if cache is not None:
            hit = await cache.lookup(tool, call.arguments, query, vector, ctx)
            if hit is None:
                flight = await cache.join_flight(
                    tool, call.arguments, query, ctx,
                    wait_seconds=self.timeout / 2, lock_seconds=self.timeout,
                )  # fmt: skip
                hit = flight.hit
            if hit is not None:
                return Routed(hit.result, cached=True, distance=hit.distance, exact=hit.exact,
                              elapsed_ms=_ms(started), saved_ms=hit.tool_ms)
        try:
            tool_started = time.perf_counter()
            result = await tool.run(call.arguments, ctx, vector)
            tool_ms = _ms(tool_started)
            if cache is not None and result.error is None and await cache.store(
                tool, call.arguments, query, vector, ctx, result, tool_ms, flight
            ):
                flight = Flight()  # released with the store, in its round trip
        finally:
            if cache is not None:
                await cache.land(flight)
        return Routed(result, elapsed_ms=_ms(started), tool_ms=tool_ms)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)
